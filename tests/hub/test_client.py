"""hf:// refs, header checks, listing and the token, with the real client against the fake Hub."""

from __future__ import annotations

import pytest

from hub.fake_hub import publish_family
from rlvr_ray.hub import client, discover
from rlvr_ray.hub.watch import WatchConfig, watch_once
from rlvr_ray.io.checkpoint import CheckpointError, open_checkpoint
from rlvr_ray.lab.planted import tensor_shapes


def test_hf_ref_resolves_to_commit_and_downloads_only_safetensors_and_json(hub, family):
    repo = hub.publish(
        "lab/q-grpo",
        {
            **{p.name: p.read_bytes() for p in family.runs["grpo"].iterdir()},
            "pytorch_model.bin": b"\x80\x04K\x01.",
            "README.md": b"# card",
        },
    )
    got = open_checkpoint("hf://lab/q-grpo@main?download")
    assert got.fingerprint == f"hf:{repo.sha}"
    assert got.pinned == f"hf://lab/q-grpo@{repo.sha}?download"
    assert sorted(p.name for p in got.path.iterdir()) == ["config.json", "model.safetensors"]
    assert got.path == client.snapshot_dir("lab/q-grpo", repo.sha)
    assert not hub.hits(r"GET .*(\.bin|README\.md)$")
    assert {k: e.shape for k, e in got.entries.items()} == tensor_shapes("qwen2", 2)
    n = len(hub.requests)
    again = open_checkpoint(f"hf://lab/q-grpo@{repo.sha}?download")  # a cached commit: offline
    assert again.path == got.path and len(hub.requests) == n
    client.remove_download("lab/q-grpo")


def test_hf_ref_errors_are_one_line_checkpoint_errors(hub):
    hub.publish("lab/pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04K\x01."})
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint hf://lab/pickled: pickle-only repo \(pytorch_model.bin\) refused",
    ):
        open_checkpoint("hf://lab/pickled")
    assert not hub.hits(r"/resolve/")  # decided from the file list: nothing was fetched
    with pytest.raises(
        CheckpointError, match=r"^checkpoint hf://lab/nope: Hub error \(RepositoryNotFoundError"
    ):
        open_checkpoint("hf://lab/nope")
    with pytest.raises(CheckpointError, match="expected hf://ORG/NAME"):
        open_checkpoint("hf://no-slash")


def test_header_specs_come_from_range_reads(hub, family, wide):
    base = hub.publish("org/base", family.base)
    specs = client.tensor_specs("org/base", base.sha)
    assert {k: v[1] for k, v in specs.items()} == tensor_shapes("qwen2", 2)
    assert {v[0] for v in specs.values()} == {"BF16"}
    gets = hub.hits(r"GET /org/base/resolve/.*/model\.safetensors")
    assert gets and all(h.get("range", h.get("Range", "")).startswith("bytes=") for _, _, h in gets)
    w = hub.publish("lab/wide", wide)
    why = client.compare_specs(specs, client.tensor_specs("lab/wide", w.sha))
    assert why == (
        "shape mismatch: tensor model.layers.0.mlp.down_proj.weight is [32, 80] here, "
        "[32, 64] in the base"
    )
    assert client.compare_specs(specs, specs) is None
    resized = dict(specs, **{"lm_head.weight": ("BF16", (100, 32))})
    assert client.compare_specs(specs, resized) is None  # vocabulary resize: compared by the engine
    assert "unsupported dtype I8" in client.compare_specs(
        specs, dict(specs, **{"model.norm.weight": ("I8", (32,))})
    )


def test_listing_filters_on_base_and_sorts_newest_first(hub, family, wide):
    publish_family(hub, family, wide)
    got = [m.repo for m in discover.list_finetunes("org/base", limit=10)]
    assert got == ["lab/q-wide-grpo", "lab/q-pickle", "lab/q-dapo", "lab/q-sft", "lab/q-grpo"]
    (query,) = [q for q in hub.raw if q.startswith("/api/models?")]
    assert "filter=base_model%3Afinetune%3Aorg%2Fbase" in query and "sort=createdAt" in query
    assert [m.repo for m in discover.list_finetunes("org/base", limit=2)] == [
        "lab/q-wide-grpo",
        "lab/q-pickle",
    ]


def test_rl_evidence():
    assert discover.rl_evidence("a/b", ("trl", "grpo"), {}) == ("tags: grpo, trl", "grpo")
    assert discover.rl_evidence("a/b", ("trl", "sft"), {}) == (None, None)
    assert discover.rl_evidence("a/Model-DAPO-7B", (), {}) == ("name: dapo", "dapo")
    assert discover.rl_evidence("a/b", ("arxiv:2402.03300",), {}) == (
        "tags: arxiv:2402.03300",
        "grpo",
    )
    assert discover.rl_evidence("a/b", (), {"tags": ["rlvr"]}) == ("tags: rlvr", None)
    assert discover.run_name("Org/Name v1.5") == "Org__Name-v1.5"


def test_dry_run_lists_and_scans_nothing(hub, family, wide, tmp_path, capsys):
    publish_family(hub, family, wide)
    out = tmp_path / "out"
    rep = watch_once(WatchConfig(("org/base",), str(out), dry_run=True, retry_wait=0.01))
    assert sorted(c.repo for c in rep.would_scan) == ["lab/q-dapo", "lab/q-grpo"]
    assert rep.decided == [] and not out.exists()
    printed = capsys.readouterr().out
    assert "would scan lab/q-grpo@" in printed and "would not scan lab/q-sft@" in printed
    # only headers were read: no whole-file download of any weight file
    assert not [
        r for r in hub.hits(r"GET .*\.safetensors$") if "range" not in {k.lower() for k in r[2]}
    ]


def test_token_is_sent_but_never_printed(hub, family, wide, tmp_path, capsys, caplog, monkeypatch):
    secret = "hf_SeCrEtToKeN0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    publish_family(hub, family, wide)
    hub.fail(r"GET /api/models/lab/q-dapo/revision", 503, times=99)
    out = tmp_path / "out"
    rep = watch_once(WatchConfig(("org/base",), str(out), dry_run=True, retries=2, retry_wait=0.01))
    assert [c.repo for c in rep.would_scan] == ["lab/q-grpo"]
    auth = {h.get("authorization") or h.get("Authorization") for _, _, h in hub.requests}
    assert auth == {f"Bearer {secret}"}
    printed = capsys.readouterr()
    assert "503" in printed.out and secret not in printed.out + printed.err + caplog.text
    assert client.scrub(f"oops {secret} here") == "oops *** here"


def test_scan_pins_branch_refs_to_the_resolved_commit(hub, family, tmp_path, ray_local):
    """A scan of hf:// refs without a commit records (and hands its workers) the commit sha."""
    import duckdb

    from rlvr_ray.engine.config import sweep_from_dict
    from rlvr_ray.engine.driver import run_scan

    base = hub.publish("org/base", {p.name: p.read_bytes() for p in family.base.iterdir()})
    run = hub.publish("lab/q-grpo", {p.name: p.read_bytes() for p in family.runs["grpo"].iterdir()})
    sweep = {
        "groups": [
            {
                "name": "g",
                "base": "hf://org/base",
                "runs": [{"name": "grpo", "checkpoint": "hf://lab/q-grpo@main"}],
            }
        ],
        "params": {"geometry": False},
    }
    res = run_scan(sweep_from_dict(sweep, tmp_path), str(tmp_path / "out"))
    assert res.exit_code == 0
    con = duckdb.connect(str(tmp_path / "out" / "atlas.duckdb"), read_only=True)
    refs = dict(con.execute("SELECT run, ref FROM checkpoints").fetchall())
    assert refs == {"base": f"hf://org/base@{base.sha}", "grpo": f"hf://lab/q-grpo@{run.sha}"}
    for repo in ("org/base", "lab/q-grpo"):
        client.remove_download(repo)
