"""The ``s3://`` checkpoint source: ``s3://bucket/prefix`` (an HF-layout "directory" of objects)
or ``s3://bucket/key.safetensors``, read by ranged GetObject requests.

boto3 rather than pyarrow.fs or fsspec: a ranged GetObject answers with the object's total size
and ETag (``Content-Range``, ``ETag``), which the size and change checks of
:mod:`rlvr_ray.io.sources.ranges` need, on a body that can be read into our buffers as it
streams; boto3 also finds credentials the usual AWS way (environment, ``~/.aws`` config and
profiles, instance roles) and honours ``AWS_ENDPOINT_URL``. Listing is one ListObjectsV2 of the
prefix; the fingerprint hashes each file's name, size and ETag (no sampled reads).

Pinned at plan time, so that actors on every node read the bytes the driver listed: in a bucket
with versioning the pinned reference names each object's version
(``s3://bucket/prefix?versions=NAME:ID,...``) and every read asks for that version, whatever is
written under the key later; without versioning it names the listing's fingerprint
(``?etags=HEX``): an actor whose own listing differs fails its units with one line, and every
read checks the object's ETag against the one listed, so an object overwritten during the scan
is an error, never a mix of old and new bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from urllib.parse import quote, unquote

from rlvr_ray.io.files import fail
from rlvr_ray.io.sources import INDEX_NAME, Listing, layout
from rlvr_ray.io.sources.ranges import Answer, Permanent, RangeReader

#: error codes a retry cannot fix
_PERMANENT = {
    *("NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId"),
    *("SignatureDoesNotMatch", "InvalidRange", "404", "403", "400", "416"),
}
_local = threading.local()


def _client():
    """A boto3 S3 client of this thread's (made once per thread and endpoint, and reused: a
    process whose ``AWS_ENDPOINT_URL`` changes gets a client for the new one)."""
    where = (os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    client = getattr(_local, "client", None)
    if client is None or _local.where != where:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=16)
        client = _local.client = boto3.session.Session().client("s3", config=config)
        _local.where = where
    return client


def parse_ref(ref: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without a trailing slash)."""
    bucket, _, prefix = ref.removeprefix("s3://").partition("/")
    if not bucket:
        fail(ref, "expected s3://BUCKET/PREFIX")
    return bucket, prefix.rstrip("/")


def _error(ref: str, e: Exception, what: str):
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    detail = f"{code}: " if code else ""
    fail(ref, f"S3 error on {what} ({detail}{' '.join(str(e).split())})")


def split_pin(ref: str) -> tuple[str, dict[str, str] | None, str | None]:
    """``s3://b/p?versions=NAME:ID,...`` or ``?etags=HEX`` -> (``s3://b/p``, name -> version
    id or None, the fingerprint's hex or None)."""
    body, _, opts = ref.partition("?")
    key, _, value = opts.partition("=")
    if key == "versions" and value:
        pairs = [p.split(":", 1) for p in value.split(",")]
        if all(len(p) == 2 and p[0] and p[1] for p in pairs):
            return body, {unquote(n): unquote(v) for n, v in pairs}, None
    elif key == "etags" and value:
        return body, None, value
    elif not opts:
        return body, None, None
    fail(ref, f"unknown option {opts!r} (known: versions=NAME:ID,..., etags=HEX)")


def _versioned(bucket: str) -> bool:
    """Whether the bucket keeps object versions (a store or a role that cannot say: no)."""
    try:
        return _client().get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"
    except Exception:
        return False


def _versions(bucket: str, folder: str) -> dict[str, tuple[str, int, str]]:
    """name -> (version id, size, ETag) of the latest version of each object in ``folder``
    (a name whose latest version is a delete marker is left out)."""
    start = f"{folder}/" if folder else ""
    out: dict[str, tuple[str, int, str]] = {}
    gone: set[str] = set()
    pages = _client().get_paginator("list_object_versions")
    for page in pages.paginate(Bucket=bucket, Prefix=start, Delimiter="/"):
        for m in page.get("DeleteMarkers", []):
            if m.get("IsLatest"):
                gone.add(m["Key"][len(start) :])
        for v in page.get("Versions", []):
            name = v["Key"][len(start) :]
            if v.get("IsLatest") and name not in gone:
                out[name] = (v["VersionId"], v["Size"], v.get("ETag", ""))
    return out


def _pinned_versions(ref, bucket, folder, pins: dict[str, str]) -> tuple[dict, dict]:
    """(sizes, ETags) of exactly the pinned versions, read with one HEAD each."""
    sizes, etags = {}, {}
    for name, vid in pins.items():
        key = f"{folder}/{name}" if folder else name
        try:
            head = _client().head_object(Bucket=bucket, Key=key, VersionId=vid)
        except Exception as e:
            _error(ref, e, f"s3://{bucket}/{key} version {vid}")
        sizes[name], etags[name] = head["ContentLength"], head.get("ETag", "")
    return sizes, etags


def open_source(ref: str) -> Listing:
    body, pins, pinned_fp = split_pin(ref)
    bucket, prefix = parse_ref(body)
    try:
        import boto3  # noqa: F401
    except ImportError:
        fail(body, "s3:// checkpoints need boto3: pip install 'rlvr-ray[s3]'")
    sizes, etags = {}, {}
    versions: dict[str, str] = dict(pins or {})
    folder = prefix
    if prefix.endswith(".safetensors"):
        folder = prefix[: -len(prefix.rsplit("/", 1)[-1])].rstrip("/")
    if pins:
        sizes, etags = _pinned_versions(body, bucket, folder, pins)
    else:
        sizes, etags = _list(body, bucket, prefix, folder)
        if pinned_fp is None and _versioned(bucket):
            try:
                latest = _versions(bucket, folder)
            except Exception as e:
                _error(body, e, f"s3://{bucket}/{prefix} (versions)")
            for name in sizes:  # the listed objects, at the versions listed
                vid, size, etag = latest.get(name, ("", -1, ""))
                if (size, etag) != (sizes[name], etags[name]) or vid in ("", "null"):
                    versions = {}  # written between the two listings: not pinned this time
                    break
                versions[name] = vid
    reader = S3Reader(body, bucket, folder, sizes, etags, versions)
    listing = layout(body, body, sizes, reader)
    h = hashlib.sha256()  # ETags are content hashes (MD5, or MD5 of the parts' MD5s)
    for name in listing.files:
        h.update(f"{name}\0{sizes[name]}\0{etags.get(name, '')}\0".encode())
    digest = h.hexdigest()[:32]
    if pinned_fp is not None and pinned_fp != digest:
        fail(
            body,
            "its objects changed since the scan was planned (ETags differ; enable versioning "
            "on the bucket to scan a prefix that is being written)",
        )
    listing.fingerprint = "s3:" + digest
    used = {*listing.files, "config.json", INDEX_NAME}  # what a scan reads; not README etc.
    versions = {n: v for n, v in versions.items() if n in used}
    if versions:
        listing.pinned = f"{body}?versions=" + ",".join(
            f"{quote(n, safe='')}:{quote(v, safe='')}" for n, v in sorted(versions.items())
        )
    else:
        listing.pinned = f"{body}?etags={digest}"
    return listing


def _list(ref: str, bucket: str, prefix: str, folder: str) -> tuple[dict, dict]:
    """(sizes, ETags) of the latest objects of ``ref``: the prefix's, or one file and the
    config.json next to it."""
    sizes, etags = {}, {}
    try:
        if prefix.endswith(".safetensors"):
            head = _client().head_object(Bucket=bucket, Key=prefix)
            name = prefix.rsplit("/", 1)[-1]
            sizes[name], etags[name] = head["ContentLength"], head.get("ETag", "")
        else:
            pages = _client().get_paginator("list_objects_v2")
            start = f"{folder}/" if folder else ""
            for page in pages.paginate(Bucket=bucket, Prefix=start, Delimiter="/"):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(start) :]
                    sizes[name], etags[name] = obj["Size"], obj.get("ETag", "")
    except Exception as e:
        _error(ref, e, f"s3://{bucket}/{prefix}")
    if prefix.endswith(".safetensors"):
        config = f"{folder}/config.json" if folder else "config.json"
        try:
            head = _client().head_object(Bucket=bucket, Key=config)
            sizes["config.json"], etags["config.json"] = head["ContentLength"], head.get("ETag", "")
        except Exception:
            pass  # a single file: config.json next to it is optional
    elif not sizes:
        fail(ref, f"no objects under s3://{bucket}/{prefix} (empty checkpoint)")
    return sizes, etags


class S3Reader(RangeReader):
    """Ranged GetObject reads of the objects under one prefix."""

    def __init__(self, ref, bucket: str, folder: str, sizes: dict, etags=None, versions=None):
        super().__init__(ref, sizes)
        self.bucket, self.folder = bucket, folder
        self.etags, self.versions = dict(etags or {}), dict(versions or {})

    def fetch(self, file: str, start: int, end: int) -> Answer:
        key = f"{self.folder}/{file}" if self.folder else file
        extra = {"VersionId": self.versions[file]} if file in self.versions else {}
        try:
            got = _client().get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra
            )
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in _PERMANENT:
                raise Permanent(f"S3 {code} for s3://{self.bucket}/{key}") from None
            raise
        total = got.get("ContentRange", "").rpartition("/")[2]
        body = got["Body"]
        listed, etag = self.etags.get(file), got.get("ETag")
        if listed and etag and etag != listed:
            body.close()
            raise Permanent(f"object changed since it was listed (ETag {listed} -> {etag})")
        return Answer(_chunks(body), int(total) if total.isdigit() else None, got.get("ETag"))


def _chunks(body):
    try:
        yield from body.iter_chunks(1 << 20)
    finally:
        body.close()
