"""Hub access: ``hf://org/name@revision`` refs, retries, safetensors header checks, downloads.

Everything goes through the real ``huggingface_hub`` client. The endpoint is read from
``HF_ENDPOINT`` at call time (the client reads it once, at import), and the token is the
client's usual one (``HF_TOKEN`` or the stored login); it is never printed: :func:`scrub` removes
it from any message that leaves this package. Only ``*.safetensors`` and ``*.json`` files are
ever downloaded; a repo with pickle weights only is refused before anything is fetched.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rlvr_ray.io.files import FLOAT_DTYPES, PICKLE_SUFFIXES, CheckpointError

ALLOW_PATTERNS = ["*.safetensors", "*.json"]
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
T = TypeVar("T")


def endpoint() -> str:
    """The Hub endpoint: $HF_ENDPOINT, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    """Where Hub snapshots go: $RLVR_RAY_CACHE/hub, else ~/.cache/rlvr-ray/hub."""
    root = os.environ.get("RLVR_RAY_CACHE")
    return Path(root).expanduser() / "hub" if root else Path.home() / ".cache/rlvr-ray/hub"


def api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def scrub(msg: str) -> str:
    """``msg`` as one line with the Hub token (if any) replaced by ``***``."""
    from huggingface_hub.utils import get_token

    token = get_token()
    msg = " ".join(str(msg).split())
    return msg.replace(token, "***") if token else msg


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> (repo id, revision or None)."""
    body = ref.removeprefix("hf://")
    repo, _, rev = body.partition("@")
    if not _REPO.match(repo):
        raise CheckpointError(f"checkpoint {ref}: expected hf://ORG/NAME[@REVISION], got {repo!r}")
    return repo, rev or None


def is_permanent(e: BaseException) -> bool:
    """Errors that a retry cannot fix: missing repo/revision/file, bad input."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        NotASafetensorsRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    permanent = (
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RemoteEntryNotFoundError,
        NotASafetensorsRepoError,
        SafetensorsParsingError,
        CheckpointError,
        ValueError,
    )
    if isinstance(e, permanent):
        return True
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        return 400 <= code < 500 and code not in (408, 429)
    return False


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 3,
    wait: float = 2.0,
    log: Callable[[str], None] = print,
) -> T:
    """Call ``fn``; transient failures (5xx, 429, network, cut downloads) are retried
    ``attempts - 1`` times with exponential backoff starting at ``wait`` seconds."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if is_permanent(e) or i == attempts - 1:
                raise
            delay = wait * 2**i
            log(
                f"watch: {what}: {type(e).__name__}: {_first_line(e)}; retry {i + 1}/{attempts - 1} in {delay:g} s"
            )
    raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return scrub(text.splitlines()[0] if text else type(e).__name__)


def describe(e: BaseException) -> str:
    """A one-line, token-free description of an error."""
    return f"{type(e).__name__}: {_first_line(e)}"


# -- repository contents ----------------------------------------------------------------------


def weight_files(siblings: list[str]) -> tuple[list[str], list[str]]:
    """-> (safetensors files, pickle weight files) among a repo's file names."""
    st = sorted(f for f in siblings if f.endswith(".safetensors"))
    pk = sorted(f for f in siblings if f.endswith(PICKLE_SUFFIXES))
    return st, pk


def refuse_pickle_only(name: str, siblings: list[str]) -> None:
    """Raise CheckpointError when a repo has no safetensors weights (never fetch a pickle)."""
    st, pk = weight_files(siblings)
    if st:
        return
    if pk:
        raise CheckpointError(
            f"checkpoint {name}: pickle-only repo ({', '.join(pk[:3])}) refused: "
            "rlvr-ray never downloads or unpickles pickle weights"
        )
    raise CheckpointError(f"checkpoint {name}: no *.safetensors files in the repo")


@dataclass(frozen=True)
class RepoState:
    """What the Hub says about one revision of a repo."""

    repo: str
    sha: str
    files: tuple[str, ...]
    tags: tuple[str, ...]
    created: object  # datetime | None
    card_data: dict


def repo_state(repo: str, revision: str | None = None) -> RepoState:
    info = api().model_info(repo, revision=revision)
    card = info.card_data.to_dict() if info.card_data is not None else {}
    files = tuple(s.rfilename for s in info.siblings or [])
    return RepoState(repo, info.sha, files, tuple(info.tags or ()), info.created_at, card)


def tensor_specs(repo: str, sha: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from the safetensors headers only (HTTP range reads)."""
    meta = api().get_safetensors_metadata(repo, revision=sha)
    out = {}
    for fm in meta.files_metadata.values():
        for name, t in fm.tensors.items():
            out[name] = (t.dtype, tuple(t.shape))
    return out


def compare_specs(base: dict, run: dict) -> str | None:
    """Why ``run`` cannot be compared with ``base`` (None: it can). A vocabulary resize of the
    embeddings / lm_head is allowed: the engine compares the common rows."""
    missing = sorted(set(base) - set(run))
    if missing:
        return f"{len(missing)} base tensors missing, e.g. {missing[0]}"
    extra = sorted(set(run) - set(base))
    if extra:
        return f"{len(extra)} tensors not in the base, e.g. {extra[0]}"
    for name in sorted(base):
        (_, s0), (d1, s1) = base[name], run[name]
        if d1 not in FLOAT_DTYPES:
            return f"tensor {name}: unsupported dtype {d1}"
        if s0 != s1:
            vocab = ("embed" in name or "lm_head" in name) and s0[1:] == s1[1:]
            if not vocab:
                return f"shape mismatch: tensor {name} is {list(s1)} here, {list(s0)} in the base"
    return None


# -- downloads --------------------------------------------------------------------------------


def snapshot_dir(repo: str, sha: str, root: Path | None = None) -> Path:
    root = root or cache_dir()
    return root / f"models--{repo.replace('/', '--')}" / "snapshots" / sha


def download(repo: str, sha: str, root: Path | None = None) -> Path:
    """Download the safetensors and json files of ``repo`` at commit ``sha`` -> snapshot path.

    The client writes each file to ``*.incomplete`` and renames it when its size checks out, so
    an interrupted download leaves no partial file in the snapshot.
    """
    from huggingface_hub import snapshot_download

    root = root or cache_dir()
    path = snapshot_download(
        repo, revision=sha, cache_dir=str(root), endpoint=endpoint(), allow_patterns=ALLOW_PATTERNS
    )
    return Path(path)


def remove_download(repo: str, root: Path | None = None) -> None:
    """Delete everything cached for ``repo`` (blobs, snapshots, refs)."""
    root = root or cache_dir()
    name = f"models--{repo.replace('/', '--')}"
    shutil.rmtree(root / name, ignore_errors=True)
    shutil.rmtree(root / ".locks" / name, ignore_errors=True)


def _cached(repo: str, sha: str) -> Path | None:
    snap = snapshot_dir(repo, sha)
    if snap.is_dir() and any(snap.glob("*.safetensors")):
        return snap
    return None


def resolve_hf(ref: str, repo: str, rev: str | None) -> tuple[Path, str]:
    """Download ``repo`` at ``rev`` (checkpoint ``ref``) -> (its local snapshot, commit sha).

    A full commit sha already in the cache needs no network (scan workers re-open refs).
    """
    if rev and _SHA.match(rev) and (snap := _cached(repo, rev)):
        return snap, rev
    try:
        state = with_retries(lambda: repo_state(repo, rev), f"{repo}: model info", log=quiet)
        refuse_pickle_only(ref, list(state.files))
        path = with_retries(lambda: download(repo, state.sha), f"{repo}: download", log=quiet)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {ref}: Hub error ({describe(e)})") from None
    return path, state.sha


def quiet(msg: str) -> None:
    pass
