"""hf:// checkpoints read by byte range on a real multi-node Ray (ray.cluster_utils.Cluster: a
CPU-less head and two 1-CPU worker nodes, one actor on each) from the fake Hub.

The Hub tells which process sent each request from the connection itself (/proc: the socket's
owner), and the unit reports say which process ran on which node, so the bytes each node
fetched are counted by the server: they must be exactly the tensor bytes of the units that ran
on that node. A ranged response cut mid-body on one node is resumed there, and the tables match
a scan of the same files on disk row for row.
"""

from __future__ import annotations

import pytest
from faultlib import both_actors_up
from remotelib import (
    BUCKET,
    UNIT_BYTES,
    counting_s3,
    layout,
    peer_pid,
    scan,
    sweep,
    tables,
    tensor_bytes,
)

from hub.fake_hub import FakeHub
from rlvr_ray.engine.driver import ScanResult, _open_group
from rlvr_ray.engine.plan import plan_group
from rlvr_ray.hub import client

pytestmark = pytest.mark.slow
RUNS = ("grpo-a", "dapo")
REPOS = {"base": "org/base", "grpo-a": "lab/grpo-a", "dapo": "lab/dapo"}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:  # a session-wide local Ray from another module: park it, restore it after
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        if was_up:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub that knows which process sent each request."""
    server = FakeHub(who=peer_pid).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_tables(cluster, qwen_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    res = scan(str(qwen_family.base), {r: str(qwen_family.runs[r]) for r in RUNS}, out)
    assert res.exit_code == 0, res.failures
    return tables(out)


def _dirs(fam) -> dict:
    return {"base": fam.base, **{r: fam.runs[r] for r in RUNS}}


def node_shares(res, base_ref, refs, out, dirs, served, workers):
    """Check what each node fetched against its units; -> (node -> tensor bytes fetched, node
    -> the tensor bytes of the units it ran). ``served``: (pid, checkpoint name, file, first
    byte, bytes, ranged) of every body the server sent."""
    # the plan of the same refs: unit -> its tensors; each tensor's bytes in each checkpoint
    sw = sweep(base_ref, refs, out)
    (group,) = sw.scan_groups()
    opened = ScanResult(str(out))
    base, runs = _open_group(group, opened) or (None, opened.failures)
    assert base is not None and len(runs) == len(RUNS), runs
    plan = plan_group(group, base, runs, sw.params, UNIT_BYTES)
    assert [plan.scan_id] == res.scan_ids and len(plan.units) == res.n_units >= 4
    sizes = {name: tensor_bytes(d) for name, d in dirs.items()}
    unit_bytes = {}
    for u in plan.units:
        unit_bytes[u.index] = sum(
            sizes["base"][t.base_tensor or t.name]
            + sum(sizes[r][t.run_tensor(i)] for i, r in enumerate(RUNS))
            for t in u.tensors
        )
    assert sum(unit_bytes.values()) == sum(sum(s.values()) for s in sizes.values())

    node_of = {r["pid"]: r["node_id"] for r in res.units}
    assert set(node_of.values()) == {w.node_id for w in workers}  # units ran on both nodes
    share = {n: 0 for n in node_of.values()}
    for r in res.units:
        share[r["node_id"]] += unit_bytes[r["unit"]]
    files = {(name, f): fl for name, d in dirs.items() for f, fl in layout(d).items()}
    fetched = {n: 0 for n in share}
    for pid, name, file, start, n, ranged in served:
        assert pid is not None, (name, file, start)
        if not file.endswith(".safetensors"):
            continue  # config.json and the index: read whole, as they are small
        header, data = files[(name, file)]
        assert ranged and n < header + data, (pid, name, file)  # never a whole weights file
        if start >= header:  # tensor data: only the actors read it
            assert pid in node_of, (pid, name, file, start, n)
            fetched[node_of[pid]] += n
    assert fetched == share and all(fetched.values())
    return fetched, share


def report(what: str, fetched: dict, share: dict) -> None:
    print(f"\n{what} tensor bytes per node (node: fetched by the server's count / its share):")
    for n in sorted(share):
        print(f"  {n[:12]}: {fetched[n]} / {share[n]}")


def test_each_node_fetches_its_units_tensors_only_and_a_cut_is_resumed(
    cluster, hub, qwen_family, local_tables, tmp_path
):
    _, workers = cluster
    dirs = _dirs(qwen_family)
    for name, repo in REPOS.items():
        hub.publish(repo, dirs[name])
    # the first tensor read of lab/dapo longer than 3000 bytes is cut after 1000 bytes
    hub.cut(r"GET /lab/dapo/resolve/", times=1, after=1000, ranged=True, longer_than=3000)
    cache = list(client.cache_dir().glob("models--*"))
    refs = {r: f"hf://{REPOS[r]}" for r in RUNS}
    base_ref = "hf://org/base"
    seen: list = []
    out = tmp_path / "hf"
    res = scan(base_ref, refs, out, on_unit=lambda r: both_actors_up(r, seen))
    assert res.exit_code == 0 and not res.retried, res.failures
    assert tables(out) == local_tables
    assert [f[3] for f in hub.faults] == [0]  # the cut happened

    name_of = {repo: name for name, repo in REPOS.items()}
    served = [(p, name_of[repo], f, a, n, r) for p, repo, f, a, n, r in hub.served_by]
    fetched, share = node_shares(res, base_ref, refs, out, dirs, served, workers)
    # the cut response was resumed by the process it was cut on, from the byte it stopped at
    cut = [e for e in hub.served_by if e[1] == "lab/dapo" and e[4] == 1000]
    assert len(cut) == 1
    pid, _, file, start, _, _ = cut[0]
    assert pid in {r["pid"] for r in res.units}
    assert any(e[0] == pid and e[2] == file and e[3] == start + 1000 for e in hub.served_by)
    # nothing downloaded whole, no snapshot cache made (all nodes share this machine's disk)
    assert list(client.cache_dir().glob("models--*")) == cache
    report("hf://", fetched, share)


def test_s3_each_node_fetches_its_units_tensors_only(cluster, qwen_family, local_tables, tmp_path):
    pytest.importorskip("boto3")
    _, workers = cluster
    dirs = _dirs(qwen_family)
    with counting_s3(BUCKET, who=peer_pid) as (s3, counting):
        for name, d in dirs.items():
            for p in sorted(d.iterdir()):
                s3.upload_file(str(p), BUCKET, f"mn/{name}/{p.name}")
        refs = {r: f"s3://{BUCKET}/mn/{r}" for r in RUNS}
        base_ref = f"s3://{BUCKET}/mn/base"
        seen: list = []
        out = tmp_path / "s3"
        res = scan(base_ref, refs, out, on_unit=lambda r: both_actors_up(r, seen))
        assert res.exit_code == 0 and not res.retried, res.failures
        assert tables(out) == local_tables
        served = []
        for pid, key, a, n, ranged in counting.served_by:
            _, bucket, _, name, file = key.split("/")
            assert bucket == BUCKET
            served.append((pid, name, file, a, n, ranged))
        fetched, share = node_shares(res, base_ref, refs, out, dirs, served, workers)
    report("s3://", fetched, share)
