"""s3:// checkpoints read by ranged GetObject on a real local Ray (2 actors) from a local moto
S3 server that counts the body bytes it sends: tables identical row for row to a scan of the
same files on disk, only headers and tensors fetched, a missing bucket or object a one-line
error for that checkpoint only."""

from __future__ import annotations

import pytest
from remotelib import BUCKET, counting_s3, layout, scan, tables

RUNS = ("grpo-a", "dapo")


@pytest.fixture(scope="module")
def s3():
    """A counting moto S3 server on 127.0.0.1 with one bucket; AWS_ENDPOINT_URL points at it."""
    pytest.importorskip("boto3")
    with counting_s3(BUCKET) as (client, counting):
        yield client, counting


def _upload(client, directory, prefix: str) -> None:
    for p in sorted(directory.iterdir()):
        client.upload_file(str(p), BUCKET, f"{prefix}/{p.name}")


@pytest.mark.slow  # ~40 s: two scans on the shared local Ray
def test_s3_scan_matches_local_and_fetches_only_headers_and_tensors(
    s3, qwen_family, tmp_path, ray_local
):
    client, counting = s3
    dirs = {"base": qwen_family.base, **{r: qwen_family.runs[r] for r in RUNS}}
    for name, d in dirs.items():
        _upload(client, d, f"ft/{name}")
    local = tmp_path / "local"
    assert (
        scan(str(qwen_family.base), {r: str(qwen_family.runs[r]) for r in RUNS}, local).exit_code
        == 0
    )
    counting.served.clear()
    out = tmp_path / "s3"
    res = scan(f"s3://{BUCKET}/ft/base", {r: f"s3://{BUCKET}/ft/{r}/" for r in RUNS}, out)
    assert res.exit_code == 0, res.failures
    assert tables(out) == tables(local)
    for name, d in dirs.items():
        for file, (header, data) in layout(d).items():
            key = f"/{BUCKET}/ft/{name}/{file}"
            served = [(a, n, r) for k, a, n, r in counting.served if k == key]
            assert all(r for _, _, r in served), key  # no whole download
            assert sum(n for a, n, _ in served if a >= header) == data, key
            opened = sum(n for a, n, _ in served if a < header)
            assert opened % header == 0 and 1 <= opened // header <= 3, (key, opened)


def test_missing_bucket_or_object_fails_that_checkpoint_only(s3, qwen_family):
    from rlvr_ray.io.checkpoint import CheckpointError, open_checkpoint

    client, _ = s3
    _upload(client, qwen_family.base, "one/base")
    ck = open_checkpoint(f"s3://{BUCKET}/one/base")
    assert ck.fingerprint.startswith("s3:") and len(ck.entries) == len(
        open_checkpoint(str(qwen_family.base)).entries
    )
    with pytest.raises(CheckpointError) as e:
        open_checkpoint("s3://no-such-bucket/x")
    assert str(e.value).startswith(
        "checkpoint s3://no-such-bucket/x: S3 error on s3://no-such-bucket/x (NoSuchBucket: "
    )
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(f"s3://{BUCKET}/nothing-here")
    assert str(e.value) == (
        f"checkpoint s3://{BUCKET}/nothing-here: no objects under s3://{BUCKET}/nothing-here "
        "(empty checkpoint)"
    )
    # an object deleted after the listing: its read is a one-line error naming file and tensor
    name = next(iter(ck.entries))
    e0 = ck.entries[name]
    client.delete_object(Bucket=BUCKET, Key=f"one/base/{e0.file}")
    with pytest.raises(CheckpointError) as e:
        ck.read_exact(e0, 0, memoryview(bytearray(e0.nbytes)))
    assert str(e.value) == (
        f"checkpoint s3://{BUCKET}/one/base, file {e0.file}, tensor {name}: "
        f"S3 NoSuchKey for s3://{BUCKET}/one/base/{e0.file}"
    )


def _read_all(ck) -> dict[str, bytes]:
    out = {}
    for name, e in ck.entries.items():
        buf = bytearray(e.nbytes)
        ck.read_exact(e, 0, memoryview(buf))
        out[name] = bytes(buf)
    return out


def _on_disk(directory) -> dict[str, bytes]:
    from rlvr_ray.io.checkpoint import open_checkpoint

    return {
        name: (directory / e.file).read_bytes()[e.start : e.end]
        for name, e in open_checkpoint(str(directory)).entries.items()
    }


def test_a_versioned_bucket_pins_each_object_version_at_plan_time(s3, qwen_family):
    """Every process that reopens the pinned ref reads the versions listed at plan time, even
    after the objects were overwritten."""
    from rlvr_ray.io.checkpoint import open_checkpoint

    client, _ = s3
    client.create_bucket(Bucket="versioned")
    client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    base, run = qwen_family.base, qwen_family.runs["dapo"]
    for p in sorted(base.iterdir()):
        client.upload_file(str(p), "versioned", f"ck/{p.name}")
    client.put_object(Bucket="versioned", Key="ck/README.md", Body=b"# not read by a scan")
    ids = {
        v["Key"].removeprefix("ck/"): v["VersionId"]
        for v in client.list_object_versions(Bucket="versioned", Prefix="ck/")["Versions"]
    }
    ck = open_checkpoint("s3://versioned/ck")
    assert ck.pinned == "s3://versioned/ck?versions=" + ",".join(
        f"{n}:{ids[n]}" for n in sorted(ids) if n != "README.md"
    )
    for p in sorted(run.iterdir()):  # the run's files overwrite the base's, same names
        client.upload_file(str(p), "versioned", f"ck/{p.name}")
    again = open_checkpoint(ck.pinned)
    assert _read_all(again) == _on_disk(base) != _on_disk(run)
    assert again.fingerprint == ck.fingerprint
    assert _read_all(open_checkpoint("s3://versioned/ck")) == _on_disk(run)


def test_an_unversioned_bucket_pins_the_etags_and_refuses_changed_objects(s3, qwen_family):
    from rlvr_ray.io.checkpoint import CheckpointError, open_checkpoint

    client, _ = s3
    base, run = qwen_family.base, qwen_family.runs["dapo"]
    _upload(client, base, "pin/base")
    ck = open_checkpoint(f"s3://{BUCKET}/pin/base")
    assert ck.pinned == f"s3://{BUCKET}/pin/base?etags={ck.fingerprint.removeprefix('s3:')}"
    assert _read_all(open_checkpoint(ck.pinned)) == _on_disk(base)
    shard = "model-00002-of-00002.safetensors"
    client.upload_file(str(run / shard), BUCKET, f"pin/base/{shard}")
    # a process opening the pinned ref after the change: one line, nothing read
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(ck.pinned)
    assert str(e.value) == (
        f"checkpoint s3://{BUCKET}/pin/base: its objects changed since the scan was planned "
        "(ETags differ; enable versioning on the bucket to scan a prefix that is being written)"
    )
    # one that opened it before: its next read of the changed object is refused
    name, entry = next((n, e) for n, e in ck.entries.items() if e.file == shard)
    with pytest.raises(CheckpointError) as e:
        ck.read_exact(entry, 0, memoryview(bytearray(entry.nbytes)))
    old = client.head_object(Bucket=BUCKET, Key=f"pin/base/{shard}")["ETag"]
    assert str(e.value).startswith(
        f"checkpoint s3://{BUCKET}/pin/base, file {shard}, tensor {name}: object changed since "
        "it was listed (ETag "
    ) and str(e.value).endswith(f"-> {old})")
