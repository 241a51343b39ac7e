"""A scan stopped early keeps what it wrote and a rerun resumes: Ctrl-C (SIGINT to the real
CLI mid-scan: one line, Ray stopped, exit 130) and a results directory on a real filesystem that
fills up (a small tmpfs: one line naming it, exit 3, the parts written before intact)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from faultlib import assert_same_results, changed_in, expected_changed, sweep_dict

from rlvr_ray.cli import main
from rlvr_ray.lab.planted import planted_family

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "rlvr-ray")
FLAGS = ["--unit-mb", "0", "--no-geometry"]  # unit-mb 0: one unit per tensor (~100 units)


@pytest.fixture(scope="module")
def family(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("stop")
    fam = planted_family(root / "fam", "qwen2", layers=8, seed=6, runs={"grpo": 0.2, "dapo": 0.3})
    sweep = root / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(sweep_dict(fam)))
    clean = root / "clean"
    assert main(["scan", str(sweep), "--out", str(clean), *FLAGS]) == 0
    return fam, sweep, clean


def _markers(out: Path) -> int:
    return sum(1 for _ in out.glob("units/*/*.json"))


def _descendants(pid: int) -> set[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p}
        out |= kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False


def _start(sweep: Path, out: Path, executor: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    flags = ["--num-cpus", "1", "--executor", executor]
    return subprocess.Popen(
        [CLI, "scan", str(sweep), "--out", str(out), *flags, *FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _ours(stderr: str) -> list[str]:
    # not Ray's own logs, nor the warning about a shared machine's readable Ray token file
    lines = [x for x in stderr.splitlines() if x.startswith("rlvr-ray: ")]
    return [x for x in lines if "Ray token file" not in x]


def _resume(sweep: Path, out: Path, clean: Path, done: int, capsys) -> None:
    capsys.readouterr()
    assert main(["scan", str(sweep), "--out", str(out), *FLAGS]) == 0
    total = _markers(clean)
    assert f"in {total} units ({done} already done)" in capsys.readouterr().out
    assert_same_results(out, clean)


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_ctrl_c_mid_scan_is_one_line_stops_ray_and_a_rerun_resumes(
    family, tmp_path, capsys, executor
):
    """On Ray, its processes are stopped too; in-process, none was started."""
    fam, sweep, clean = family
    out = tmp_path / "results"
    proc = _start(sweep, out, executor)
    try:
        deadline = time.monotonic() + 180
        while _markers(out) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, "scan ended too early"
            time.sleep(0.05)
        ray_procs = _descendants(proc.pid)  # the embedded Ray: GCS, raylet, workers
        assert bool(ray_procs) == (executor == "ray")
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = _ours(err)
    m = re.fullmatch(
        rf"rlvr-ray: interrupted: (\d+) of (\d+) units are kept in {out}; "
        r"rerun the same command to resume",
        line,
    )
    assert m, line
    kept, total = int(m[1]), int(m[2])
    assert total == _markers(clean) and 5 <= kept < total
    t_end = time.monotonic() + 30  # Ray was stopped: none of its processes is left
    while any(_alive(p) for p in ray_procs) and time.monotonic() < t_end:
        time.sleep(0.5)
    assert not [p for p in ray_procs if _alive(p)]
    done = _markers(out)
    assert kept <= done < total  # (a unit may have been written as the signal came)
    assert not list(out.rglob(".tmp-*"))  # the atlas made empty while the units ran is gone
    _resume(sweep, out, clean, done, capsys)
    assert changed_in(out) == expected_changed(fam)


#: the small disk: less than the family's tables, more than one unit's parts and marker
SMALL_DISK_KIB = 128


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of SMALL_DISK_KIB (root only); -> its mount point."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_KIB}k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_disk_full_mid_scan_is_one_line_keeps_the_parts_and_a_rerun_resumes(
    family, small_disk, capsys, executor
):
    fam, sweep, clean = family
    need = sum(p.stat().st_blocks * 512 for p in (clean / "tables").rglob("*.parquet"))
    # the tables alone (merged per scan: smaller than the unit parts and markers written as it
    # runs, a page each at least) do not fit: the disk fills mid-scan, after a unit or more
    assert need > SMALL_DISK_KIB * 1024, need
    out = small_disk / "results"
    proc = _start(sweep, out, executor)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    (line,) = _ours(err)
    m = re.fullmatch(
        rf"rlvr-ray: error: disk full writing to {out}: (\d+) of (\d+) units are "
        r"kept; free some space and rerun the same command to resume",
        line,
    )
    assert m, line
    done = _markers(out)
    assert int(m[1]) == done and 0 < done < int(m[2]) == _markers(clean)
    # what was written is whole: no temporary file left, every part reads, every unit marked
    # done has its tensors rows
    assert not list(out.rglob(".tmp-*"))
    for part in (out / "tables").rglob("*.parquet"):
        pq.read_table(part)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    _resume(sweep, out, clean, done, capsys)
