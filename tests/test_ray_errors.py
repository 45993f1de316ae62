"""An actor killed by Ray's memory monitor counts as lost (rlsys.ray_errors.ACTOR_LOST).

Every place that replaces a dead engine or reward worker, or restarts the learner group,
catches ACTOR_LOST. A call on an actor that the monitor killed raises OutOfMemoryError, which
is no RayActorError: a demo run whose engine the monitor killed crashed at its next ping. The
test makes the monitor kill a real actor, in a cluster of its own whose threshold sits a little
above what the node uses now, so that nothing else on the machine is at risk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from learners.learner import node_memory_available

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, shutil, sys, tempfile, time
    import ray
    from rlsys.ray_errors import ACTOR_LOST

    @ray.remote(max_restarts=0)
    class Hog:
        def __init__(self):
            self.blocks = []

        def grow(self, mb: int, steps: int) -> int:
            for _ in range(steps):
                block = bytearray(mb << 20)
                block[::4096] = b"x" * len(block[::4096])  # touch every page
                self.blocks.append(block)
                time.sleep(0.2)
            return len(self.blocks)

        def ping(self) -> bool:
            return True

    temp_dir = tempfile.mkdtemp(prefix="rlsys-oom-")  # short: Ray's socket paths live in it
    ray.init(address="local", _temp_dir=temp_dir, num_cpus=1, include_dashboard=False,
             log_to_driver=False)
    hog = Hog.remote()
    ray.get(hog.ping.remote())
    result = {}
    for call in ("grow", "ping"):
        try:
            ray.get(hog.grow.remote(256, 24) if call == "grow" else hog.ping.remote(),
                    timeout=120)
            result[call] = "returned"
        except Exception as exc:  # noqa: BLE001 - the type is what the test checks
            result[call] = [type(exc).__name__, isinstance(exc, ACTOR_LOST)]
    print("RESULT " + json.dumps(result))
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
""")


def test_an_actor_killed_by_the_memory_monitor_counts_as_lost(tmp_path):
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # The monitor fires 1.5 GiB above today's use; the actor grows to 6 GiB in 256 MiB steps.
    threshold = min(1 - node_memory_available() + 1.5 * 2**30 / total, 0.95)
    env = {**os.environ, "RAY_memory_usage_threshold": f"{threshold:.4f}",
           "RAY_memory_monitor_refresh_ms": "100", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["grow"] == ["OutOfMemoryError", True], result
    assert result["ping"][1] is True, result
