"""Discovery and download of Hub checkpoints: ``hf://org/name@revision`` refs and the watch.

Importing this package registers the ``hf`` reference scheme; it stays cheap (huggingface_hub
is imported only when a ref is resolved).
"""

from __future__ import annotations

from rlvr_ray.io.checkpoint import ResolvedRef, register_scheme


def resolver(ref: str) -> ResolvedRef:
    """Resolve ``hf://org/name[@revision]`` to a local snapshot (safetensors + json files only)."""
    from rlvr_ray.hub.client import resolve_hf

    return resolve_hf(ref)


register_scheme("hf", resolver)
