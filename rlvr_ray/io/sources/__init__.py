"""Checkpoint sources: where a checkpoint's bytes live, behind one byte-range reader.

A source is a module with ``open_source(ref: str) -> Listing``: it pins the reference (a Hub
branch becomes its commit), lists the checkpoint's safetensors files with their sizes, reads
``config.json`` and the index if any, and hands back a :class:`Reader` that reads any byte range
of any of those files. :mod:`rlvr_ray.io.checkpoint` does the rest (headers, checks, tensors)
the same way for every source.

Sources are found by the scheme of the reference in :data:`SOURCES`, a table of module paths
imported on first use in whichever process needs one (so a Ray actor has every source the
driver has). Adding a source is one module plus one line here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Protocol

from rlvr_ray.io.files import (
    MAX_JSON_BYTES,
    PICKLE_SUFFIXES,
    fail,
    parse_json_object,
)

#: scheme -> the module that opens references of that scheme ("file" is a plain path)
SOURCES = {
    "file": "rlvr_ray.io.sources.local",
    "hf": "rlvr_ray.hub.source",
    "s3": "rlvr_ray.io.sources.s3",
}
INDEX_NAME = "model.safetensors.index.json"
DOWNLOAD = "download"  # the reference option asking for a whole download
DOWNLOADABLE = ("hf",)  # sources that take it
#: settings of this process that the sources of actors on any node need: where the Hub and the
#: object store are (credentials come from each node's own environment or config, unless
#: forwarding them is asked for: a single-user cluster, a test)
FORWARDED_ENV = (
    "HF_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
CREDENTIAL_ENV = {
    "RLVR_RAY_FORWARD_HF_TOKEN": ("HF_TOKEN",),
    "RLVR_RAY_FORWARD_AWS_CREDENTIALS": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ),
}


class Reader(Protocol):
    """Reads byte ranges of a checkpoint's files (the names its :class:`Listing` gives).

    Every method may be called from any thread. ``pread`` returns fewer bytes than asked only
    at the end of a file; any failure is a one-line CheckpointError naming the file; ``limit``
    (where the caller's tensor ends) allows reading ahead up to it. Readers pickle without their
    open handles (descriptors, connections) and reopen them on use."""

    def pread(self, file: str, offset: int, view: memoryview, limit: int | None = None) -> int: ...

    def will_need(self, file: str, offset: int, nbytes: int) -> bool: ...

    def descriptor(self, file: str) -> int | None: ...

    def close(self) -> None: ...


@dataclass
class Listing:
    """What a source says about one checkpoint: enough to read its headers and tensors."""

    pinned: str  # a reference that reopens exactly these bytes
    root: str  # where it is, for messages
    files: list[str]  # its safetensors files, as the reader names them, in order
    sizes: dict[str, int]  # bytes of each file
    reader: Reader
    config: dict | None = None
    weight_map: dict[str, str] | None = None  # tensor -> file, from the index
    fingerprint: str | None = None  # None: the checkpoint hashes its headers and samples


def source_env() -> dict[str, str]:
    """The environment variables of this process that actors' sources need."""
    names = list(FORWARDED_ENV)
    for flag, secret in CREDENTIAL_ENV.items():
        if os.environ.get(flag) == "1":
            names += secret
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def with_download(ref: str) -> str:
    """``ref`` asking its source to download the checkpoint whole and read it from the cache
    (``hf://...?download``); references of other sources are returned unchanged."""
    if scheme(ref) not in DOWNLOADABLE or "?" in ref:
        return ref
    return f"{ref}?{DOWNLOAD}"


def scheme(ref: str) -> str:
    return ref.split("://", 1)[0] if "://" in ref else "file"


def open_source(ref: str) -> Listing:
    """The listing of ``ref`` from the source its scheme names (a one-line error if none)."""
    name = scheme(ref)
    if name not in SOURCES:
        fail(ref, f"unknown reference scheme {name!r} (known: {sorted(SOURCES)})")
    return importlib.import_module(SOURCES[name]).open_source(ref)


def read_whole(ref: str, reader: Reader, file: str, size: int, what: str) -> dict:
    """A small JSON object file of a remote listing (config.json, the index), strict."""
    if size > MAX_JSON_BYTES:
        fail(ref, f"{what} ({size} bytes > {MAX_JSON_BYTES} limit)", file)
    buf = bytearray(size)
    got = reader.pread(file, 0, memoryview(buf))
    if got != size:
        fail(ref, f"short read ({got} of {size} bytes)", file)
    return parse_json_object(bytes(buf), ref, file, what)


def layout(ref: str, root: str, sizes: dict[str, int], reader: Reader, **kw) -> Listing:
    """The listing of a remote directory of files ``sizes`` (name -> bytes): the index's shards
    if it has one, else every ``*.safetensors`` file; its config.json. Pickle-only: refused."""
    weight_map = None
    if INDEX_NAME in sizes:
        index = read_whole(ref, reader, INDEX_NAME, sizes[INDEX_NAME], "malformed index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and v not in (".", "..")
            for v in weight_map.values()
        ):
            fail(
                ref, "malformed index (weight_map must map tensors to shard file names)", INDEX_NAME
            )
        files = sorted(set(weight_map.values()))
        for shard in files:
            if shard not in sizes:
                names = sorted(k for k, v in weight_map.items() if v == shard)
                fail(ref, f"index names missing shard {shard}", INDEX_NAME, names[0])
    else:
        files = sorted(n for n in sizes if n.endswith(".safetensors"))
    if not files:
        pickles = sorted(n for n in sizes if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            fail(
                ref,
                f"pickle checkpoint ({', '.join(pickles)}) refused: rlvr-ray never "
                "unpickles; convert it to safetensors",
            )
        fail(ref, f"no *.safetensors files in {root} (empty checkpoint)")
    config = None
    if "config.json" in sizes:
        config = read_whole(
            ref, reader, "config.json", sizes["config.json"], "malformed config.json"
        )
    return Listing(ref, root, files, sizes, reader, config, weight_map, **kw)
