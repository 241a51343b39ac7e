"""The watch end to end: the real huggingface_hub client against the fake Hub, real local Ray,
real scans; answers computed from the planted bit patterns."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from hub.fake_hub import publish_family
from rlvr_ray.hub.client import cache_dir
from rlvr_ray.hub.watch import WatchConfig, watch_once


def cfg(out, **kw) -> WatchConfig:
    return WatchConfig(
        bases=("org/base",),
        out=str(out),
        retries=3,
        retry_wait=0.05,
        geometry=False,
        workers=1,
        **kw,
    )


def expected_changed(family, run: str) -> dict[str, int]:
    return {
        k: int(np.count_nonzero(v != family.bits["base"][k])) for k, v in family.bits[run].items()
    }


def rows(out, sql: str) -> list[tuple]:
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def watch_table(out) -> dict[str, tuple]:
    got = rows(out, "SELECT repo, status, reason, attempt, scan_id, rl_evidence FROM watch")
    return {r[0]: r[1:] for r in got}


def test_watch_scans_new_rl_finetunes_once(hub, family, wide, ray_local, tmp_path):
    publish_family(hub, family, wide)
    out = tmp_path / "out"
    rep = watch_once(cfg(out))
    assert rep.exit_code == 0
    w = watch_table(out)
    assert set(w) == {"lab/q-grpo", "lab/q-sft", "lab/q-dapo", "lab/q-pickle", "lab/q-wide-grpo"}
    assert w["lab/q-grpo"][0] == w["lab/q-dapo"][0] == "scanned"
    assert w["lab/q-grpo"][4] == "tags: grpo, trl; name: grpo"
    assert w["lab/q-dapo"][4] == "tags: dapo; name: dapo"  # from the card's tags
    assert w["lab/q-sft"][:2] == ("skipped", "no RL evidence (tags, card or name)")
    assert (
        w["lab/q-pickle"][0] == "skipped"
        and "pickle-only repo (pytorch_model.bin)" in w["lab/q-pickle"][1]
    )
    assert w["lab/q-wide-grpo"][0] == "skipped"
    assert (
        "shape mismatch: tensor model.layers.0.mlp.down_proj.weight is [32, 80] here, [32, 64]"
        in w["lab/q-wide-grpo"][1]
    )
    # the atlas: exact per-tensor change counts of the two RL runs, under the base's group
    for repo, run in (("lab__q-grpo", "grpo"), ("lab__q-dapo", "dapo")):
        got = dict(
            rows(
                out,
                f"SELECT tensor, n_changed FROM tensors WHERE group_name = 'org__base' AND run = '{repo}'",
            )
        )
        assert got == expected_changed(family, run)
    algos = dict(rows(out, "SELECT run, algorithm FROM run_sparsity"))
    assert algos == {"lab__q-grpo": "grpo", "lab__q-dapo": "dapo"}
    fps = dict(rows(out, "SELECT run, fingerprint FROM checkpoints"))
    assert fps["base"] == f"hf:{hub.repos['org/base'].sha}"
    assert fps["lab__q-grpo"] == f"hf:{hub.repos['lab/q-grpo'].sha}"
    # nothing pickled was fetched; the misfit and the SFT run had no weights downloaded
    assert not hub.hits(r"GET .*\.bin$")
    assert not hub.hits(r"GET /lab/q-(wide-grpo|sft)/resolve/.*/model\.safetensors") or all(
        "Range" in h or "range" in h for _, _, h in hub.hits(r"GET /lab/q-wide-grpo/resolve")
    )
    assert not (cache_dir() / "models--lab--q-grpo").exists()  # nothing downloaded
    assert hub.bytes_served(r"\.safetensors$", ranged=False) == 0  # no weights file whole

    # a new model is published: the next round scans it and only it
    hub.publish("lab/q-late-grpo", family.runs["late"], tags=["grpo"], base="org/base")
    hub.fail(r"GET /api/models/lab/q-late-grpo", 503, times=2)  # transient: retried
    n_before = len(hub.requests)
    rep = watch_once(cfg(out))
    assert [c.repo for c in rep.decided] == ["lab/q-late-grpo"]
    assert rep.decided[0].status == "scanned"
    # 2 x 503, then the watch's check; then the scan's driver and its actor pin the commit
    assert len(hub.hits(r"GET /api/models/lab/q-late-grpo/revision")) == 3 + 2
    new = hub.requests[n_before:]
    assert not [r for r in new if "/lab/q-grpo/" in r[1] or "/lab/q-dapo/" in r[1]]
    got = dict(rows(out, "SELECT tensor, n_changed FROM tensors WHERE run = 'lab__q-late-grpo'"))
    assert got == expected_changed(family, "late")
    assert len(rows(out, "SELECT * FROM run_sparsity")) == 3  # earlier runs kept
    # a third round has nothing new to do
    assert watch_once(cfg(out)).decided == []


@pytest.mark.slow  # ~21 s: two scans plus the client's own 1 s resume waits
def test_failures_are_recorded_and_retried_next_round(hub, family, wide, ray_local, tmp_path):
    hub.publish("org/base", family.base)
    hub.publish("lab/down-grpo", family.runs["grpo"], tags=["grpo"], base="org/base")
    hub.publish("lab/cut-dapo", family.runs["dapo"], tags=["dapo"], base="org/base")
    hub.fail(r"GET /api/models/lab/down-grpo/revision", 503, times=99)  # keeps failing
    # the body of the download is cut twice (6 client attempts each with no byte received);
    # the client gives up, our retry starts again and gets the whole file
    hub.cut(r"GET /lab/cut-dapo/resolve/.*/model\.safetensors", times=6, after=0)
    out = tmp_path / "out"
    rep = watch_once(cfg(out, download=True))
    assert rep.exit_code == 3
    w = watch_table(out)
    assert w["lab/down-grpo"][:1] == ("failed",) and "503" in w["lab/down-grpo"][1]
    assert w["lab/down-grpo"][2] == 1
    assert w["lab/cut-dapo"][0] == "scanned"  # the watch went on, the cut download was redone
    got = dict(rows(out, "SELECT tensor, n_changed FROM tensors WHERE run = 'lab__cut-dapo'"))
    assert got == expected_changed(family, "dapo")
    assert len(hub.hits(r"GET /api/models/lab/down-grpo/revision")) == 3
    # the Hub recovers: the failed one is retried (attempt 2) and scanned; the other is not
    hub.faults.clear()
    rep = watch_once(cfg(out, download=True))
    assert [(c.repo, c.status, c.attempt) for c in rep.decided] == [("lab/down-grpo", "scanned", 2)]
    assert watch_table(out)["lab/down-grpo"][:1] == ("scanned",)


@pytest.mark.parametrize("keep", [True])
def test_download_that_keeps_breaking_leaves_no_partial_file(hub, family, tmp_path, keep):
    hub.publish("org/base", family.base)
    hub.publish("lab/cut-grpo", family.runs["grpo"], tags=["grpo"], base="org/base")
    hub.cut(r"GET /lab/cut-grpo/resolve/.*/model\.safetensors", times=999, after=0)
    out = tmp_path / "out"
    cfg = WatchConfig(("org/base",), str(out), retries=1, download=True, keep=keep, geometry=False)
    rep = watch_once(cfg)
    (c,) = rep.decided
    assert c.status == "failed" and c.reason.startswith("download: ")
    snap = cache_dir() / "models--lab--cut-grpo" / "snapshots"
    assert not list(snap.rglob("*.safetensors"))  # no half file where a reader would look
    assert watch_table(out)["lab/cut-grpo"][0] == "failed"


def _corrupt_config(family, run: str) -> dict[str, bytes]:
    """The run's files with a config.json that is not UTF-8 (its safetensors are fine, so the
    header check before the download passes)."""
    files = {p.name: p.read_bytes() for p in sorted(family.runs[run].iterdir()) if p.is_file()}
    return files | {"config.json": b'{"model_type": "qwen2\xff\xfe"}'}


def test_a_corrupt_candidate_fails_alone_and_is_retried(hub, family, ray_local, tmp_path):
    hub.publish("org/base", family.base)
    hub.publish("lab/good-grpo", family.runs["grpo"], tags=["grpo"], base="org/base")
    bad = hub.publish(
        "lab/bad-dapo", _corrupt_config(family, "dapo"), tags=["dapo"], base="org/base"
    )
    out = tmp_path / "out"
    rep = watch_once(cfg(out))
    assert rep.exit_code == 3 and rep.errors == []
    decided = {c.repo: c for c in rep.decided}
    assert decided["lab/good-grpo"].status == "scanned"
    got = dict(rows(out, "SELECT tensor, n_changed FROM tensors WHERE run = 'lab__good-grpo'"))
    assert got == expected_changed(family, "grpo")
    w = watch_table(out)
    assert w["lab/good-grpo"][0] == "scanned" and w["lab/good-grpo"][3] is not None
    status, reason, attempt = w["lab/bad-dapo"][:3]
    assert (status, attempt) == ("failed", 1)
    # its own one-line reason: which checkpoint (repo and commit) and why
    assert f"hf://lab/bad-dapo@{bad.sha}" in reason and "\n" not in reason
    assert "utf-8" in reason.lower() or "config.json" in reason
    assert not rows(out, "SELECT * FROM tensors WHERE run = 'lab__bad-dapo'")
    # the next round retries only the bad one (attempt 2); the good one is left alone
    n_before = len(hub.requests)
    rep = watch_once(cfg(out))
    assert [(c.repo, c.status, c.attempt) for c in rep.decided] == [("lab/bad-dapo", "failed", 2)]
    assert not [r for r in hub.requests[n_before:] if "/lab/good-grpo/" in r[1]]
    assert watch_table(out)["lab/good-grpo"][0] == "scanned"


def test_a_unit_failure_is_pinned_on_its_candidate_by_scanning_each_alone(
    hub, family, ray_local, tmp_path, monkeypatch
):
    """A unit fails (here: a worker that breaks on one candidate's tensors): the round's
    candidates are scanned alone, the good one is scanned and the other fails by itself."""
    from rlvr_ray.engine import cluster
    from rlvr_ray.engine.actor import ScanActor

    class Breaks(ScanActor):  # a local class: Ray ships it by value
        def run_unit(self, unit):
            if any(r.name == "lab__poison-grpo" for r in unit.runs):
                raise RuntimeError("cannot compare this checkpoint")
            return super().run_unit(unit)

    monkeypatch.setattr(cluster, "actor_class", lambda: Breaks)
    hub.publish("org/base", family.base)
    hub.publish("lab/good-grpo", family.runs["grpo"], tags=["grpo"], base="org/base")
    hub.publish("lab/poison-grpo", family.runs["dapo"], tags=["grpo"], base="org/base")
    out = tmp_path / "out"
    watch_once(cfg(out))
    w = watch_table(out)
    assert w["lab/good-grpo"][0] == "scanned"
    assert w["lab/poison-grpo"][:2] == (
        "failed",
        "unit failed: RuntimeError: cannot compare this checkpoint",
    )
    got = dict(rows(out, "SELECT tensor, n_changed FROM tensors WHERE run = 'lab__good-grpo'"))
    assert got == expected_changed(family, "grpo")


def test_a_corrupt_base_is_an_error_of_the_round_and_charges_no_candidate(
    hub, family, ray_local, tmp_path
):
    files = {p.name: p.read_bytes() for p in sorted(family.base.iterdir()) if p.is_file()}
    broken = hub.publish("org/base", files | {"config.json": b"\xff"})
    hub.publish("lab/good-grpo", family.runs["grpo"], tags=["grpo"], base="org/base")
    out = tmp_path / "out"
    rep = watch_once(cfg(out))
    assert rep.exit_code == 3 and rep.decided == []
    (err,) = rep.errors
    assert err == (
        f"base org/base@{broken.sha[:7]}: checkpoint hf://org/base@{broken.sha}, "
        "file config.json: malformed config.json (not UTF-8)"
    )
    assert not (out / "tables/watch").exists() or not list((out / "tables/watch").iterdir())
    # the base is fixed (a new commit): the candidate is scanned at its first attempt
    hub.publish("org/base", family.base)
    rep = watch_once(cfg(out))
    assert [(c.repo, c.status, c.attempt) for c in rep.decided] == [("lab/good-grpo", "scanned", 1)]
