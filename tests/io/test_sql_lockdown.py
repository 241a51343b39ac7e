"""``rlvr-ray sql`` and ``summary`` read the atlas and nothing else, on a real scan's atlas.

Each refused statement gets one line on stderr and leaves every file of the results directory
(and the other database, and the file it would write) as it was; every view still answers what
a plain read-only DuckDB connection to the atlas answers; ``--allow-external`` lifts the lock.
"""

from __future__ import annotations

import hashlib
import os

import duckdb
import pytest
from faultlib import expected_changed, sweep_dict

from rlvr_ray.cli import main
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.io import catalog

HINT = " (rlvr-ray sql reads the atlas only; --allow-external lifts this)"


def _denied(path: str) -> str:
    return (
        f'rlvr-ray: error: Permission Error: Cannot access file "{path}" - file system '
        f"operations are disabled by configuration{HINT}"
    )


@pytest.fixture(scope="module")
def scanned(llama_family, ray_local, tmp_path_factory):
    """A results directory of a real scan (geometry on, so spectra have rows)."""
    root = tmp_path_factory.mktemp("lockdown")
    data = sweep_dict(llama_family, geometry=True)
    data["params"] |= {"rank_k": 2, "spectral_k": 2}
    res = run_scan(sweep_from_dict(data, root), str(root / "out"))
    assert res.exit_code == 0, res.errors + res.skipped
    return root / "out"


def _files(out) -> dict[str, tuple[int, str]]:
    """Every file under the results directory -> (size, sha256)."""
    got = {}
    for d, _, names in os.walk(out):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                got[os.path.relpath(p, out)] = (
                    os.path.getsize(p),
                    hashlib.sha256(f.read()).hexdigest(),
                )
    return got


def _sql(capsys, out, q: str, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["sql", q, "--out", str(out), "--format", "csv", *flags])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _refused(capsys, out, q: str, want: str) -> None:
    before = _files(out)
    rc, stdout, err = _sql(capsys, out, q)
    assert (rc, stdout, err) == (2, "", want + "\n")
    assert _files(out) == before


def test_copy_into_the_tables_is_refused(scanned, capsys):
    part = str(scanned / "tables" / "tensors" / "extra.parquet")
    _refused(
        capsys,
        scanned,
        f"COPY (SELECT * FROM tensors_all) TO '{part}' (FORMAT parquet)",
        _denied(part),
    )
    assert not os.path.exists(part)


def test_copy_to_any_path_is_refused(scanned, capsys, tmp_path):
    target = str(tmp_path / "out.csv")
    _refused(capsys, scanned, f"COPY (SELECT 1) TO '{target}'", _denied(target))
    assert os.listdir(tmp_path) == []


def test_reading_a_file_outside_the_results_is_refused(scanned, capsys, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("k,v\nkey,hunter2\n")
    _refused(capsys, scanned, f"SELECT * FROM read_csv('{secret}')", _denied(str(secret)))


def test_allow_external_lets_read_csv_work(scanned, capsys, tmp_path):
    secret = tmp_path / "data.csv"
    secret.write_text("k,v\nkey,hunter2\n")
    rc, stdout, err = _sql(
        capsys, scanned, f"SELECT * FROM read_csv('{secret}')", "--allow-external"
    )
    assert (rc, err) == (0, "")
    assert stdout.splitlines() == ["k,v", "key,hunter2"]


def test_attach_and_drop_of_another_database_are_refused(scanned, capsys, tmp_path):
    other = str(tmp_path / "other.duckdb")
    con = duckdb.connect(other)
    con.execute("CREATE TABLE t AS SELECT * FROM range(3)")
    con.close()
    _refused(
        capsys,
        scanned,
        f"ATTACH '{other}' AS o; DROP TABLE o.t",
        "rlvr-ray: error: one SQL statement per query, got 2",
    )
    _refused(capsys, scanned, f"ATTACH '{other}' AS o", _denied(other))
    con = duckdb.connect(other, read_only=True)
    assert con.execute("SELECT count(*) FROM t").fetchone() == (3,)
    con.close()


def test_install_and_load_are_refused(scanned, capsys):
    before = _files(scanned)
    rc, stdout, err = _sql(capsys, scanned, "INSTALL httpfs")
    assert (rc, stdout) == (2, "")
    assert err.startswith('rlvr-ray: error: Permission Error: Cannot access directory "')
    assert err.endswith(f'" - file system operations are disabled by configuration{HINT}\n')
    assert err.count("\n") == 1
    _refused(
        capsys,
        scanned,
        "LOAD httpfs",
        "rlvr-ray: error: Permission Error: Loading "
        f"external extensions is disabled through configuration{HINT}",
    )
    assert _files(scanned) == before


def test_external_access_cannot_be_set_back(scanned, capsys):
    for q in (
        "SET enable_external_access = true",
        "RESET enable_external_access",
        "SET lock_configuration = false",
    ):
        name = q.split()[1]
        _refused(
            capsys,
            scanned,
            q,
            f"rlvr-ray: error: Invalid Input Error: Cannot change "
            f'configuration option "{name}" - the configuration has been locked',
        )


def test_one_statement_per_query(scanned, capsys):
    _refused(
        capsys, scanned, "SELECT 1; SELECT 2", "rlvr-ray: error: one SQL statement per query, got 2"
    )


def test_every_view_and_table_reads_as_without_the_lock(scanned):
    """Locked, every view and table answers exactly what a plain read-only connection does."""
    plain = duckdb.connect(str(scanned / catalog.ATLAS), read_only=True)
    names = [*catalog.VIEWS, *(f"{t}_all" for t in catalog.ALL_TABLES)]
    try:
        for name in names:
            q = f"SELECT * FROM {name} ORDER BY ALL"
            want = plain.execute(q).fetchall()
            assert catalog.query(scanned, q, external_access=False)[1] == want, name
        n = {
            v: plain.execute(f"SELECT count(*) FROM {v}").fetchone()[0]
            for v in ("tensors", "profiles", "spectra", "consistency", "summary")
        }
    finally:
        plain.close()
    assert min(n.values()) > 0, n


def test_sql_and_summary_answer_from_the_locked_atlas(scanned, llama_family, capsys):
    q = "SELECT run, sum(n_changed) AS n FROM tensors GROUP BY run ORDER BY run"
    rc, stdout, err = _sql(capsys, scanned, q)
    want = {}
    for (run, _), n in expected_changed(llama_family).items():
        want[run] = want.get(run, 0) + n
    assert (rc, err) == (0, "")
    assert stdout.splitlines() == ["run,n", *(f"{r},{want[r]}" for r in sorted(want))]
    assert main(["summary", "--out", str(scanned), "--format", "csv", "--table", "runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "group_name,run,algorithm,step,sparsity,ulp1_share,coverage,tensor_coverage"
    assert sorted(line.split(",")[1] for line in lines[1 : 1 + len(want)]) == sorted(want)


def test_the_python_api_keeps_full_access(scanned, tmp_path):
    """Opening a locked connection does not lock one already open to the same atlas."""
    full = catalog.connect(scanned)
    try:
        catalog.query(scanned, "SELECT 1", external_access=False)
        target = tmp_path / "copy.csv"
        full.execute(f"COPY (SELECT 42 AS x) TO '{target}'")
        assert target.read_text() == "x\n42\n"
    finally:
        full.close()
