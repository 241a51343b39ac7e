"""The ``s3://`` checkpoint source: ``s3://bucket/prefix`` (an HF-layout "directory" of objects)
or ``s3://bucket/key.safetensors``, read by ranged GetObject requests.

boto3 rather than pyarrow.fs or fsspec: a ranged GetObject answers with the object's total size
and ETag (``Content-Range``, ``ETag``), which the size and change checks of
:mod:`rlvr_ray.io.sources.ranges` need, on a body that can be read into our buffers as it
streams; boto3 also finds credentials the usual AWS way (environment, ``~/.aws`` config and
profiles, instance roles) and honours ``AWS_ENDPOINT_URL``. Listing is one ListObjectsV2 of the
prefix; the fingerprint hashes each file's name, size and ETag (no sampled reads).
"""

from __future__ import annotations

import hashlib
import threading

from rlvr_ray.io.files import fail
from rlvr_ray.io.sources import Listing, layout
from rlvr_ray.io.sources.ranges import Answer, Permanent, RangeReader

#: error codes a retry cannot fix
_PERMANENT = {
    *("NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId"),
    *("SignatureDoesNotMatch", "InvalidRange", "404", "403", "400", "416"),
}
_local = threading.local()


def _client():
    """A boto3 S3 client of this thread's (clients are made once per thread and reused)."""
    client = getattr(_local, "client", None)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=16)
        client = _local.client = boto3.session.Session().client("s3", config=config)
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


def open_source(ref: str) -> Listing:
    bucket, prefix = parse_ref(ref)
    try:
        import boto3  # noqa: F401
    except ImportError:
        fail(ref, "s3:// checkpoints need boto3: pip install 'rlvr-ray[s3]'")
    sizes, etags = {}, {}
    try:
        if prefix.endswith(".safetensors"):
            head = _client().head_object(Bucket=bucket, Key=prefix)
            name = prefix.rsplit("/", 1)[-1]
            sizes[name], etags[name] = head["ContentLength"], head.get("ETag", "")
            folder = prefix[: -len(name)].rstrip("/")
        else:
            folder = prefix
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
            sizes["config.json"] = head["ContentLength"]
        except Exception:
            pass  # a single file: config.json next to it is optional
    elif not sizes:
        fail(ref, f"no objects under s3://{bucket}/{prefix} (empty checkpoint)")
    reader = S3Reader(ref, bucket, folder, sizes)
    listing = layout(ref, ref, sizes, reader)
    h = hashlib.sha256()  # ETags are content hashes (MD5, or MD5 of the parts' MD5s)
    for name in listing.files:
        h.update(f"{name}\0{sizes[name]}\0{etags.get(name, '')}\0".encode())
    listing.fingerprint = "s3:" + h.hexdigest()[:32]
    return listing


class S3Reader(RangeReader):
    """Ranged GetObject reads of the objects under one prefix."""

    def __init__(self, ref: str, bucket: str, folder: str, sizes: dict):
        super().__init__(ref, sizes)
        self.bucket, self.folder = bucket, folder

    def fetch(self, file: str, start: int, end: int) -> Answer:
        key = f"{self.folder}/{file}" if self.folder else file
        try:
            got = _client().get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in _PERMANENT:
                raise Permanent(f"S3 {code} for s3://{self.bucket}/{key}") from None
            raise
        total = got.get("ContentRange", "").rpartition("/")[2]
        body = got["Body"]
        return Answer(_chunks(body), int(total) if total.isdigit() else None, got.get("ETag"))


def _chunks(body):
    try:
        yield from body.iter_chunks(1 << 20)
    finally:
        body.close()
