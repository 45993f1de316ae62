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


@pytest.fixture(scope="session")
def ray_metrics(ray_cluster):
    """`scrape(pattern)`: lines of the session cluster's Prometheus export that match."""
    return scrape_ray_metrics


def scrape_ray_metrics(pattern: str, timeout_s: float = 45.0) -> list[str]:
    """Lines of the node's Prometheus export (the metrics port Ray serves for the dashboard)
    that match `pattern`, polled until some appear: Ray exports every ~10 s."""
    import re
    import time
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        found = [line for line in body.splitlines()
                 if not line.startswith("#") and re.search(pattern, line)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(2)
