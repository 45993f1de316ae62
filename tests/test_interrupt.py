"""Ctrl-C on a running job stops every actor and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest


@pytest.mark.timeout(300)
def test_ctrl_c_stops_all_actors(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    ray_dir = tempfile.mkdtemp(prefix="rlsys-ray-")  # short: Ray's socket paths are limited
    # Its own local cluster (not the test session's), many steps so it is mid-run when hit.
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlsys.run", "conf=tiny", "trainer.steps=1000",
         "trainer.eval_every=0", f"trainer.output_dir={out}", f"ray.temp_dir={ray_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        # A shell that starts pytest in the background makes it ignore SIGINT, and the child
        # would inherit that (Python then installs no KeyboardInterrupt handler): a terminal's
        # Ctrl-C reaches a driver with the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    driver = psutil.Process(proc.pid)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    family = driver.children(recursive=True)
    assert any("RolloutWorker" in " ".join(p.cmdline()) for p in family)

    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted: actors stopped" in output
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
