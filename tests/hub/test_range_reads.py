"""hf:// checkpoints read by byte range on a real local Ray (2 actors) from the fake Hub: the
tables match a scan of the same files on disk row for row, the Hub served the tensors' bytes
and headers only (never a whole weights file), a response cut mid-body is resumed, and a missing
repo or file is a one-line error for that checkpoint only."""

from __future__ import annotations

import pytest
from remotelib import layout, scan, tables

from rlvr_ray.hub.source import HubReader
from rlvr_ray.io.checkpoint import CheckpointError, open_checkpoint

RUNS = ("grpo-a", "dapo")


@pytest.fixture(scope="module")
def local_tables(qwen_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    res = scan(str(qwen_family.base), {r: str(qwen_family.runs[r]) for r in RUNS}, out)
    assert res.exit_code == 0
    return tables(out)


def _publish(hub, fam) -> dict[str, str]:
    """Base and runs on the Hub -> checkpoint name -> repo id."""
    repos = {"base": "org/base", **{r: f"lab/{r}" for r in RUNS}}
    for name, repo in repos.items():
        hub.publish(repo, fam.base if name == "base" else fam.runs[name])
    return repos


def _dirs(fam) -> dict[str, object]:
    return {"base": fam.base, **{r: fam.runs[r] for r in RUNS}}


def test_range_scan_matches_local_and_fetches_only_headers_and_tensors(
    hub, qwen_family, local_tables, tmp_path, ray_local
):
    repos = _publish(hub, qwen_family)
    out = tmp_path / "out"
    res = scan("hf://org/base@main", {r: f"hf://{repos[r]}" for r in RUNS}, out)
    assert res.exit_code == 0, res.failures
    assert tables(out) == local_tables
    for name, directory in _dirs(qwen_family).items():
        repo = repos[name]
        for file, (header, data) in layout(directory).items():
            served = [(a, n, ranged) for r, f, a, n, ranged in hub.served if (r, f) == (repo, file)]
            assert all(ranged for _, _, ranged in served), (repo, file)  # no whole download
            assert sum(n for a, n, _ in served if a >= header) == data, (repo, file)
            opened = sum(n for a, n, _ in served if a < header)
            assert opened % header == 0 and 1 <= opened // header <= 3, (repo, file, opened)


def test_a_response_cut_mid_body_is_resumed(hub, qwen_family, local_tables, tmp_path, ray_local):
    repos = _publish(hub, qwen_family)
    hub.cut(r"GET /lab/dapo/resolve/", times=3, after=1000, ranged=True, longer_than=3000)
    out = tmp_path / "out"
    res = scan("hf://org/base", {r: f"hf://{repos[r]}" for r in RUNS}, out)
    assert res.exit_code == 0, res.failures
    assert [f[3] for f in hub.faults] == [0]  # every cut happened
    cut = [(a, n) for r, _, a, n, _ in hub.served if r == "lab/dapo" and n == 1000]
    assert len(cut) >= 3
    assert tables(out) == local_tables


def test_missing_repo_or_file_fails_that_checkpoint_only(hub, qwen_family, tmp_path, ray_local):
    repos = _publish(hub, qwen_family)
    sha = hub.repos["lab/dapo"].sha
    hub.fail(r"GET /lab/dapo/resolve/.*model-00002-of-00002", 404, times=100)
    out = tmp_path / "out"
    res = scan(
        "hf://org/base",
        {"grpo-a": "hf://lab/grpo-a", "nope": "hf://lab/nope", "dapo": f"hf://{repos['dapo']}"},
        out,
    )
    reasons = {f.run: f.message for f in res.failures}
    assert reasons.keys() == {"nope", "dapo"}
    assert reasons["nope"] == (
        "checkpoint hf://lab/nope: Hub error (RepositoryNotFoundError: 404 Client Error.)"
    )
    assert reasons["dapo"] == (
        "checkpoint hf://lab/dapo, file model-00002-of-00002.safetensors: "
        f"not found at commit {sha[:12]} (HTTP 404)"
    )
    assert all("\n" not in r for r in reasons.values())
    assert set(tables(out)["tensors"]) and {k[0] for k in tables(out)["tensors"]} == {"grpo-a"}


def test_reader_resumes_a_cut_and_checks_size_and_sha(hub, qwen_family):
    hub.publish("org/base", qwen_family.base)
    ck = open_checkpoint("hf://org/base")
    assert (
        isinstance(ck.reader, HubReader)
        and ck.pinned == f"hf://org/base@{hub.repos['org/base'].sha}"
    )
    name = max(ck.entries, key=lambda k: ck.entries[k].nbytes)
    e = ck.entries[name]
    on_disk = (qwen_family.base / e.file).read_bytes()[e.start : e.end]
    hub.cut(r"GET /org/base/resolve/", times=2, after=500, ranged=True, longer_than=1000)
    buf = bytearray(e.nbytes)
    ck.read_exact(e, 0, memoryview(buf))
    assert bytes(buf) == on_disk and [f[3] for f in hub.faults] == [0]
    starts = [a for r, f, a, n, _ in hub.served if f == e.file and a >= e.start]
    assert starts == [e.start, e.start + 500, e.start + 1000]  # resumed where each cut stopped
    # a file that is not what the listing says (size, sha256) is an error naming it
    ck.reader.sizes[e.file] += 1
    with pytest.raises(CheckpointError, match=r"it changed$"):
        ck.read_exact(e, 0, memoryview(buf))
    ck.reader.sizes[e.file] -= 1
    ck.reader.sha256["config.json"] = "0" * 64
    ck.reader.sizes.setdefault("config.json", len((qwen_family.base / "config.json").read_bytes()))
    whole = bytearray(ck.reader.sizes["config.json"])
    with pytest.raises(
        CheckpointError, match=r"file config.json: sha256 .* is not the listed 000000"
    ):
        ck.reader.pread("config.json", 0, memoryview(whole))


@pytest.mark.slow  # ~20 s: a scan on the shared local Ray
def test_download_option_scans_a_cached_snapshot(
    hub, qwen_family, local_tables, tmp_path, ray_local
):
    from rlvr_ray import api
    from rlvr_ray.hub import client

    repos = _publish(hub, qwen_family)
    out = tmp_path / "out"
    runs = {f"{r}:grpo": f"hf://{repos[r]}" for r in RUNS}
    res = api.scan(
        base="hf://org/base",
        runs=runs,
        group="g",
        out=out,
        params={"geometry": False},
        workers=2,
        unit_mb=1,
        download=True,
    )
    assert res.exit_code == 0, res.failures
    assert tables(out) == local_tables
    for name, directory in _dirs(qwen_family).items():
        sha = hub.repos[repos[name]].sha
        snap = client.snapshot_dir(repos[name], sha)
        for file in layout(directory):
            assert (snap / file).read_bytes() == (directory / file).read_bytes()
            # downloaded once, whole, by the driver; the actors read the cache
            assert hub.bytes_served(f"^{repos[name]}/{file}$") == (directory / file).stat().st_size
        client.remove_download(repos[name])


def test_a_tensor_read_in_windows_is_read_ahead_in_one_request(hub, qwen_family):
    hub.publish("org/base", qwen_family.base)
    ck = open_checkpoint("hf://org/base")
    e = max(ck.entries.values(), key=lambda e: e.nbytes)
    on_disk = (qwen_family.base / e.file).read_bytes()[e.start : e.end]
    n_before = len(hub.served)
    got = bytearray(e.nbytes)
    view = memoryview(got)
    for a in range(0, e.nbytes, 512):  # as the fused pass reads: window after window
        ck.read_exact(e, a, view[a : a + 512])
    assert bytes(got) == on_disk
    served = [(a, n) for _, f, a, n, _ in hub.served[n_before:]]
    # the first window, then the rest of the tensor at once: nothing beyond its end
    assert served == [(e.start, 512), (e.start + 512, e.nbytes - 512)]
