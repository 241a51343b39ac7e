"""The atlas file opens in the DuckDB 1.x readers people have (the `duckdb` CLI, old clients)."""

import os
import struct
import subprocess
import venv

import pyarrow as pa
import pytest

from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import SCANS

# DuckDB's main header: 8 bytes of checksum, b"DUCK", then the storage version number (u64).
# DuckDB 1.0-1.4 read 64 ("v1.0.0") and up to their own; DuckDB 2 writes newer ones by default.
V1_0_0 = 64


def atlas_header(path):
    with open(path, "rb") as f:
        head = f.read(20)
    return head[8:12], struct.unpack("<Q", head[12:20])[0]


def test_atlas_is_written_in_the_storage_every_duckdb_1x_reads(tmp_path):
    out = tmp_path / "results"
    (out / "tables").mkdir(parents=True)
    path = catalog.refresh(str(out))
    assert atlas_header(path) == (b"DUCK", V1_0_0)
    # grown in place by an update, it keeps that storage
    row = {"scan_id": "s1", "group_name": "g", "n_units": 1, "runs": ["a"]}
    ResultsDir(out).write_table("scans", "s1", pa.Table.from_pylist([row], schema=SCANS))
    assert catalog.update(str(out), ["s1"]) == {"scans": 1, "parts": 1, "rows": 1}
    assert atlas_header(path) == (b"DUCK", V1_0_0)


@pytest.mark.slow
def test_a_duckdb_1x_reader_opens_a_real_atlas(llama_family, tmp_path, ray_local):
    """Installs DuckDB 1.4 into a throwaway venv (from the package index) and queries every table
    and view of an atlas this code wrote."""
    from rlvr_ray.engine.config import sweep_from_dict
    from rlvr_ray.engine.driver import run_scan

    runs = [{"name": n, "checkpoint": str(p)} for n, p in llama_family.runs.items()]
    sweep = {"groups": [{"name": "llama", "base": str(llama_family.base), "runs": runs}]}
    out = tmp_path / "results"
    assert run_scan(sweep_from_dict(sweep, tmp_path), str(out)).exit_code == 0
    env_dir = tmp_path / "duckdb1"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pip = subprocess.run(
        [py, "-m", "pip", "install", "-q", "duckdb>=1.4,<1.5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0:
        pytest.skip(f"no DuckDB 1.4 from the package index: {pip.stderr.strip()[-200:]}")
    code = (
        "import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
        "names = [n for (n,) in con.execute('SELECT table_name FROM information_schema.tables')"
        ".fetchall()]; [con.execute(f'SELECT count(*) FROM \"{n}\"').fetchall() for n in names]; "
        "print(duckdb.__version__[:4], len(names), "
        "con.execute('SELECT run, n_changed FROM run_sparsity ORDER BY run').fetchall())"
    )
    r = subprocess.run(
        [py, "-c", code, str(out / "atlas.duckdb")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr
    import duckdb

    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    n_names = con.execute("SELECT count(*) FROM information_schema.tables").fetchone()[0]
    expected = con.execute("SELECT run, n_changed FROM run_sparsity ORDER BY run").fetchall()
    con.close()
    assert r.stdout == f"1.4. {n_names} {expected}\n"
