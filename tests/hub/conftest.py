"""Fixtures of the Hub tests: a fake Hub on 127.0.0.1 (tests.hub.fake_hub) serving planted
checkpoints, with HF_ENDPOINT pointing at it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from hub.fake_hub import FakeHub
from rlvr_ray.lab.planted import planted_family

# Scan workers re-open hf://repo@sha refs from the snapshot cache; they are Ray worker processes
# that inherit the environment Ray was started with, so the cache location must be set before
# any test starts Ray (conftest modules are imported before any test runs).
_CACHE = tempfile.mkdtemp(prefix="rlvr-hub-cache-")
os.environ["RLVR_RAY_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

RUNS = {"grpo": 0.1, "dapo": 0.15, "sft": 0.9, "late": 0.12}


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A qwen2 base and four fine-tunes with planted ULP updates (bits kept for the answers)."""
    return planted_family(tmp_path_factory.mktemp("hubfam"), "qwen2", layers=2, seed=3, runs=RUNS)


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """A checkpoint of another shape (intermediate 80 instead of 64): not comparable."""
    dims = (32, 80, 4, 2, 96, True)
    return planted_family(
        tmp_path_factory.mktemp("wide"), "qwen2", layers=2, seed=4, runs={}, dims=dims
    ).base


@pytest.fixture
def hub(monkeypatch):
    """A fresh, empty fake Hub; HF_ENDPOINT points at it and no token is set."""
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()
