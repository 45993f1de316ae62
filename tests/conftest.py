"""Shared test fixtures: one local Ray cluster per test session, and a shared model cache.

The Ray cluster is started with its own temp dir (FACTS.md: a stale `ray_current_cluster`
file can make a plain `ray.init()` hang), and it is shared because starting Ray costs 4-7 s.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# No model hub is reachable here; make any accidental hub lookup fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Model cache shared by all tests (and across runs, so conversions happen once)."""
    path = Path(os.environ.get("RLSYS_CACHE_DIR", Path.home() / ".cache" / "rlsys"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session; tests that need Ray take this fixture."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rlsys-ray-")
    # Logical CPUs: actors declare CPU needs for placement; 2 physical cores are shared by time.
    ray.init(address="local", _temp_dir=temp_dir, num_cpus=8, include_dashboard=False,
             log_to_driver=True)
    yield ray
    ray.shutdown()
