"""The ``hf://`` checkpoint source: ``hf://org/name[@revision][?download]``.

By default nothing is downloaded whole. The revision is pinned to its commit with the real
``huggingface_hub`` client (its token, ``HF_TOKEN`` or the stored login, and ``HF_ENDPOINT``),
which also lists the files with their sizes and sha256; then headers, and later each actor's
tensors, are read by HTTP range requests on the Hub's resolve URLs
(``/{repo}/resolve/{sha}/{file}``), side by side, retried, resumed where a response was cut,
and checked against the listed size (and sha256, when a whole file is read).

``?download`` (``--download``, the API's ``download=True``) keeps the snapshot path instead:
the safetensors and json files are downloaded into the cache once and read from there, so
repeat scans of the same commit need no network.
"""

from __future__ import annotations

import re

from rlvr_ray.hub import client
from rlvr_ray.io.files import CheckpointError, fail
from rlvr_ray.io.sources import DOWNLOAD, Listing, layout
from rlvr_ray.io.sources.local import open_path
from rlvr_ray.io.sources.ranges import Answer, Permanent, RangeReader

TIMEOUT_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def split_options(ref: str) -> tuple[str, bool]:
    """``hf://org/name@rev?download`` -> (``hf://org/name@rev``, whether to download)."""
    body, _, opts = ref.partition("?")
    if opts not in ("", DOWNLOAD):
        fail(ref, f"unknown option {opts!r} (known: {DOWNLOAD})")
    return body, opts == DOWNLOAD


def open_source(ref: str) -> Listing:
    body, download = split_options(ref)
    repo, rev = client.parse_ref(body)
    if download:
        path, sha = client.resolve_hf(ref, repo, rev)
        listing = open_path(ref, path, pinned=f"hf://{repo}@{sha}?{DOWNLOAD}")
        listing.fingerprint = f"hf:{sha}"
        return listing
    try:
        info = client.with_retries(
            lambda: client.api().model_info(repo, revision=rev, files_metadata=True),
            f"{repo}: model info",
            log=client.quiet,
        )
    except Exception as e:
        raise CheckpointError(f"checkpoint {ref}: Hub error ({client.describe(e)})") from None
    top = [s for s in info.siblings or [] if "/" not in s.rfilename]
    client.refuse_pickle_only(ref, [s.rfilename for s in top])
    sizes = {s.rfilename: s.size for s in top if s.size is not None}
    sha256 = {s.rfilename: s.lfs.sha256 for s in top if s.lfs is not None}
    reader = HubReader(ref, repo, info.sha, sizes, sha256)
    pinned = f"hf://{repo}@{info.sha}"
    listing = layout(ref, pinned, sizes, reader, fingerprint=f"hf:{info.sha}")
    listing.pinned = pinned
    return listing


class HubReader(RangeReader):
    """Range reads of one commit's files from the Hub's resolve URLs."""

    def __init__(self, ref: str, repo: str, sha: str, sizes: dict, sha256: dict):
        super().__init__(ref, sizes, sha256)
        self.repo, self.sha = repo, sha
        self.endpoint = client.endpoint()

    def fetch(self, file: str, start: int, end: int) -> Answer:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        url = hf_hub_url(self.repo, file, revision=self.sha, endpoint=self.endpoint)
        headers = build_hf_headers() | {"Range": f"bytes={start}-{end - 1}"}
        session = get_session()
        request = session.build_request("GET", url, headers=headers, timeout=TIMEOUT_S)
        response = session.send(request, stream=True, follow_redirects=True)
        try:
            total = _answer_total(response, start, end, self.sizes[file], self.sha)
        except BaseException:
            response.close()
            raise
        return Answer(_body(response), total, response.headers.get("etag"))


def _answer_total(response, start: int, end: int, size: int, sha: str) -> int | None:
    """The file's total size that a ranged response reports; raises for an error status."""
    status = response.status_code
    if status == 206:
        m = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if not m or int(m[1]) != start:
            raise Permanent(f"bad Content-Range {response.headers.get('content-range')!r}")
        return None if m[3] == "*" else int(m[3])
    if status == 200:  # a server that ignores Range: fine only when the whole file was asked
        if start == 0 and end == size:
            return int(response.headers.get("content-length", size))
        raise Permanent("the server ignored the Range header (HTTP 200 for a range)")
    code = response.headers.get("x-error-code", "")
    if status == 404:
        raise Permanent(f"not found at commit {sha[:12]} (HTTP 404{' ' + code if code else ''})")
    if status in (401, 403):
        raise Permanent(f"access refused (HTTP {status}): log in or set HF_TOKEN")
    if status in (408, 429) or status >= 500:
        raise ConnectionError(f"HTTP {status}")
    raise Permanent(f"HTTP {status}{' ' + code if code else ''}")


def _body(response):
    try:
        yield from response.iter_raw()  # as it arrives: a cut keeps what came before it
    finally:
        response.close()
