"""Local checkpoints: an HF-layout directory or a single ``.safetensors`` file on this node.

The reader keeps one descriptor open per file and reads by ``preadv`` (from any thread, no
seek, no copy beyond the kernel's), asks the kernel to read ahead with ``posix_fadvise``, and
gives its descriptors to callers that read themselves.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rlvr_ray.io.files import (
    FILE_KINDS,
    PICKLE_SUFFIXES,
    fail,
    open_regular,
    read_json,
)
from rlvr_ray.io.sources import INDEX_NAME, Listing


class LocalReader:
    """Positional reads of local files (named by their paths) on descriptors kept open."""

    def __init__(self, ref: str):
        self.ref = ref
        self._fds: dict[str, int] = {}

    def descriptor(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd, _ = open_regular(Path(file), self.ref)
            if (kept := self._fds.setdefault(file, fd)) != fd:  # another thread was first
                os.close(fd)
                fd = kept
        return fd

    def pread(self, file: str, offset: int, view: memoryview, limit: int | None = None) -> int:
        fd, got, n = self.descriptor(file), 0, len(view)
        try:
            while got < n and (k := os.preadv(fd, [view[got:]], offset + got)):
                got += k
        except OSError as err:
            fail(self.ref, f"read failed ({err.strerror})", Path(file).name)
        return got

    def will_need(self, file: str, offset: int, nbytes: int) -> bool:
        """Have the kernel read the range into the page cache unless its first and last bytes
        are there already (advising a warm cache costs a walk over every page)."""
        fd = self.descriptor(file)
        if _resident(fd, offset) and _resident(fd, offset + nbytes - 1):
            return False
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        return True

    def close(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        self.close()

    def __getstate__(self):
        return {"ref": self.ref, "_fds": {}}


def _resident(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache (a read that may not wait)."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
    except (OSError, AttributeError):  # not in memory (EAGAIN), or no RWF_NOWAIT here
        return False


def refuse_pickles(ckpt: str, paths: list[Path]) -> None:
    pickles = [p.name for p in paths if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        fail(
            ckpt,
            f"pickle checkpoint ({', '.join(sorted(pickles))}) refused: rlvr-ray never "
            "unpickles; convert it to safetensors",
        )


def _shard_files(ckpt: str, root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """-> (the directory's safetensors files, the index's tensor -> shard map if it has one)."""
    index = root / INDEX_NAME
    if os.path.lexists(index):
        weight_map = read_json(index, ckpt, "malformed index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and not Path(v).is_absolute() and ".." not in Path(v).parts
            for v in weight_map.values()
        ):
            fail(
                ckpt,
                "malformed index (weight_map must map tensors to shard file names)",
                INDEX_NAME,
            )
        files = []
        for shard in sorted(set(weight_map.values())):
            if not os.path.lexists(root / shard):
                names = sorted(k for k, v in weight_map.items() if v == shard)
                fail(ckpt, f"index names missing shard {shard}", INDEX_NAME, names[0])
            files.append(root / shard)
        return files, weight_map
    try:
        names = sorted(os.listdir(root))
    except OSError as err:
        fail(ckpt, f"cannot list ({err.strerror})", root.name)
    files = [root / n for n in names if n.endswith(".safetensors")]
    if not files:
        refuse_pickles(ckpt, [root / n for n in names])
        fail(ckpt, f"no *.safetensors files in {root} (empty checkpoint)")
    return files, None


def open_source(ref: str) -> Listing:
    return open_path(ref, Path(ref.removeprefix("file://")).expanduser())


def open_path(ref: str, root: Path, pinned: str | None = None) -> Listing:
    """The listing of the directory or file ``root`` (checkpoint ``ref`` in messages)."""
    try:
        mode = os.stat(root).st_mode
    except OSError as err:
        if isinstance(err, (FileNotFoundError, NotADirectoryError)):
            fail(ref, f"path {root} does not exist")
        fail(ref, f"cannot open ({err.strerror})", root.name)
    weight_map = None
    if stat.S_ISREG(mode):
        refuse_pickles(ref, [root])
        if root.suffix != ".safetensors":
            fail(ref, "not a .safetensors file or HF directory", root.name)
        files, cfg_path = [root], root.parent / "config.json"
    elif stat.S_ISDIR(mode):
        files, weight_map = _shard_files(ref, root)
        weight_map = weight_map and {k: str(root / v) for k, v in weight_map.items()}
        cfg_path = root / "config.json"
    else:
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
        fail(ref, f"not a .safetensors file or HF directory ({kind})", root.name)
    config = None
    if os.path.lexists(cfg_path):
        config = read_json(cfg_path, ref, "malformed config.json")
    sizes = {str(f): _size(f, ref) for f in files}
    return Listing(
        pinned or ref, str(root), list(sizes), sizes, LocalReader(ref), config, weight_map
    )


def _size(path: Path, ref: str) -> int:
    """The size of ``path`` if it is a regular file (else a one-line error)."""
    fd, size = open_regular(path, ref)
    os.close(fd)
    return size
