"""The host buffers a worker reads tensors into, reused from tensor to tensor.

Reusing them spares page faults, and keeps a worker's memory at (runs + 1) x its largest tensor
read whole (plus (runs + 1) x 2 windows of a streamed one), which is what
``rlvr_ray.engine.memory`` estimates. Two kinds:

- keyed byte buffers (``buffer``): one per key such as ("full", slot) or ("chunk", slot, 0 | 1),
  slot 0 being the base's copy and slot i + 1 run i's. On a GPU they are pinned, and one whose
  contents are still being copied to the device is handed out again only once that copy ends.
- the arena of the fused CPU pass (``layout`` / ``slot``): one int16 buffer cut into a slot per
  copy, which the fused kernel walks as one array. It is a numpy array: a worker whose tensors
  all take the fused pass never imports torch (the keyed buffers, torch tensors, do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class Device(str):
    """A device's name as torch spells it ("cpu", "cuda", "cuda:1"), with ``torch.device``'s
    ``type``: torch calls take it as that string, and naming the CPU imports no torch."""

    __slots__ = ()

    @property
    def type(self) -> str:
        return self.partition(":")[0]


class Buffers:
    """Reusable buffers for one worker on ``device`` (where read rows end up)."""

    def __init__(self, device: Device | torch.device):
        self.device = device
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._copies: dict[tuple, torch.cuda.Event] = {}  # pinned buffer -> its copy's end
        self._arena = np.empty(0, dtype=np.int16)
        self._slot_numel = 0

    def buffer(self, key: tuple, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` for ``key``, reused while big enough."""
        import torch

        if (event := self._copies.pop(key, None)) is not None:
            event.synchronize()
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            self._bufs[key] = buf = None  # free the old one before allocating
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._bufs[key] = buf
        return buf

    def copied(self, key: tuple) -> None:
        """Buffer ``key`` was just copied to the device, asynchronously: remember when it ends."""
        if self.device.type == "cuda":
            import torch

            self._copies[key] = event = torch.cuda.Event()
            event.record()

    def layout(self, slots: int, numel: int) -> np.ndarray:
        """The arena, cut into ``slots`` slots of ``numel`` int16 elements; grown, never shrunk."""
        if self._arena.size < slots * numel:
            self._arena = np.empty(0, dtype=np.int16)  # free the old one first
            self._arena = np.empty(slots * numel, dtype=np.int16)
        self._slot_numel = numel
        return self._arena

    @property
    def arena(self) -> np.ndarray:
        """The whole arena (int16, flat)."""
        return self._arena

    @property
    def slot_numel(self) -> int:
        """Elements per slot of the current layout."""
        return self._slot_numel

    def slot(self, k: int) -> np.ndarray:
        """Slot k of the arena (int16, flat)."""
        return self._arena[k * self._slot_numel : (k + 1) * self._slot_numel]
