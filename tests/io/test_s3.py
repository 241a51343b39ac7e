"""Results in object storage: a real local S3-compatible server (moto, 127.0.0.1), real Ray.

Scan to ``s3://``, query with ``rlvr-ray sql --out s3://...``, and rerun a unit whose marker
was lost (its parts were already written): the rerun replaces the unit's objects, no duplicates.
"""

from __future__ import annotations

import os

import pytest
from faultlib import changed_in, duplicates, expected_changed, snapshot, sweep_dict
from remotelib import environ_kept

from rlvr_ray.cli import main
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir

BUCKET = "atlas"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RLVR_RAY_FORWARD_AWS_CREDENTIALS": "1",
}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; -> (endpoint, boto3 client)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with environ_kept([*ENV, "AWS_ENDPOINT_URL"]):
        os.environ.update(ENV)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        try:
            yield endpoint, client
        finally:
            server.stop()


@pytest.fixture(scope="module")
def scanned(s3, qwen_family, ray_local, tmp_path_factory):
    """A scan written through an endpoint given in the URI (AWS_ENDPOINT_URL unset)."""
    endpoint, _ = s3
    os.environ.pop("AWS_ENDPOINT_URL", None)
    uri = f"s3://{BUCKET}/scan1?endpoint_override={endpoint.removeprefix('http://')}&scheme=http"
    sweep = sweep_from_dict(sweep_dict(qwen_family), tmp_path_factory.mktemp("s3"))
    res = run_scan(sweep, uri, unit_bytes=1 << 10)
    return uri, sweep, res


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def test_scan_writes_parts_markers_and_atlas_to_the_bucket(scanned, s3, qwen_family):
    uri, _, res = scanned
    _, client = s3
    assert res.exit_code == 0 and not res.errors
    keys = _keys(client, "scan1/")
    assert "scan1/atlas.duckdb" in keys
    assert sum(k.startswith("scan1/units/") and k.endswith(".json") for k in keys) == res.n_units
    # the finished scan's unit parts are merged: one part per table, holding every unit
    parts = [k for k in keys if k.startswith("scan1/tables/tensors/") and k.endswith(".parquet")]
    assert parts == [f"scan1/tables/tensors/{res.scan_ids[0]}.parquet"]
    assert not [k for k in keys if "/." in k]  # no temporary objects
    assert changed_in(uri) == expected_changed(qwen_family)


def test_sql_reads_s3_with_the_endpoint_from_the_environment(
    scanned, s3, qwen_family, capsys, monkeypatch
):
    endpoint, _ = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    capsys.readouterr()
    q = "SELECT run, sum(n_changed) AS n FROM tensors GROUP BY run ORDER BY run"
    assert main(["sql", q, "--out", f"s3://{BUCKET}/scan1", "--format", "csv"]) == 0
    want = {}
    for (run, _), n in expected_changed(qwen_family).items():
        want[run] = want.get(run, 0) + n
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["run,n", *(f"{r},{want[r]}" for r in sorted(want))]


def test_sql_on_s3_reads_the_atlas_only(scanned, s3, capsys, monkeypatch, tmp_path):
    """The in-memory catalog built from the bucket is locked like a local atlas."""
    endpoint, _ = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    secret = tmp_path / "secret.csv"
    secret.write_text("k,v\nkey,hunter2\n")
    capsys.readouterr()
    q = f"SELECT * FROM read_csv('{secret}')"
    assert main(["sql", q, "--out", f"s3://{BUCKET}/scan1"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == (
        f'rlvr-ray: error: Permission Error: Cannot access file "{secret}" - file system '
        "operations are disabled by configuration (rlvr-ray sql reads the atlas only; "
        "--allow-external lifts this)\n"
    )


def test_queries_on_s3_fetch_the_stored_atlas_once_and_build_nothing(
    scanned, qwen_family, monkeypatch, tmp_path
):
    uri, _, _ = scanned
    monkeypatch.setenv("RLVR_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "build", lambda *a: pytest.fail("a connection built an atlas"))
    fetched: list[str] = []
    real = ResultsDir.read_file

    def read_file(self, rel, dest):
        fetched.append(rel)
        real(self, rel, dest)

    monkeypatch.setattr(ResultsDir, "read_file", read_file)
    q = "SELECT count(*), sum(n_changed) FROM tensors_all"
    want = [(len(expected_changed(qwen_family)), sum(expected_changed(qwen_family).values()))]
    assert catalog.query(uri, q)[1] == want
    assert catalog.query(uri, q, external_access=False)[1] == want
    assert fetched == ["atlas.duckdb"]  # the second connection opens the local copy


@pytest.mark.slow
def test_rerun_of_a_unit_replaces_its_objects_without_duplicates(scanned, s3):
    uri, sweep, first = scanned
    _, client = s3
    before = snapshot(uri)
    scan_id = first.scan_ids[0]
    for unit in (0, 3):  # the driver died after the parts were written, before the marker
        client.delete_object(Bucket=BUCKET, Key=f"scan1/units/{scan_id}/{unit:05d}.json")
    again = run_scan(sweep, uri, unit_bytes=1 << 10)
    assert again.exit_code == 0 and again.n_units_resumed == first.n_units - 2
    assert sorted(r["unit"] for r in again.units) == [0, 3]
    assert snapshot(uri) == before
    assert set(duplicates(uri).values()) == {0}
