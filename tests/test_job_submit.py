"""`ray job submit --working-dir . -- python -m rlsys.run ...` against a `ray start --head` cluster
with Ray's token authentication on, as the README's "On a GPU cluster" section runs it.

The head node is this test's own: its own temp dir, ports and token (a file named by
RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token is neither read nor written). It is torn down by
killing its own processes, not with `ray stop`, which stops every Ray process on the machine
(the session's `ray_cluster` included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rlsys.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # `ray` and the `python` the job's entrypoint runs
RAY = str(VENV_BIN / "ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class Head:
    url: str  # the dashboard, which serves the job API
    token: str
    env: dict[str, str]  # what the head was started with (auth on, token by path)


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str, token: str | None) -> tuple[int, str]:
    """GET url, with `Authorization: Bearer <token>` when a token is given: (status, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _answers(url: str, token: str) -> bool:
    """The dashboard is up and takes the token (connection refused until it listens)."""
    try:
        return _get(url, token)[0] == 200
    except OSError:
        return False


def _ours(proc: psutil.Process, token_path: Path) -> bool:
    """A process of this test's cluster: every one inherits the head's RAY_AUTH_TOKEN_PATH."""
    try:
        return (proc.environ().get("RAY_AUTH_TOKEN_PATH") == str(token_path)
                or str(token_path.parent) in " ".join(proc.cmdline()))
    except psutil.Error:
        return False


def _cluster_processes(token_path: Path) -> list[psutil.Process]:
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and _ours(p, token_path)]


def _stop_head(start: subprocess.Popen[bytes], token_path: Path) -> list[str]:
    """SIGTERM `ray start --block`, whose handler stops the processes it started; then kill what
    is left: raylet gives each worker its own process group and the job supervisor its driver a
    session. Returns what survived SIGKILL (should be nothing)."""
    start.terminate()
    try:
        start.wait(timeout=30)
    except subprocess.TimeoutExpired:
        start.kill()
        start.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(start.pid, signal.SIGKILL)  # its group: anything that ignored SIGTERM
    _, alive = psutil.wait_procs(_cluster_processes(token_path), timeout=10)
    for proc in alive:
        proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for proc in alive:
        proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [" ".join(p.cmdline()) for p in alive if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def auth_head() -> Iterator[Head]:
    """A one-node cluster from `ray start --head`, token authentication on, 8 logical CPUs."""
    root = Path(tempfile.mkdtemp(prefix="rlsys-js-"))  # short: Ray's socket paths are limited
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    token_path = root / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in (*AUTH_VARS, "RAY_ADDRESS")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            # On SIGTERM, stop at once rather than first drain the node (a wait for Serve).
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    gcs, dash, client, node, objm, agent_http, agent_grpc, rtenv, metrics = _free_ports(9)
    log = root / "ray_start.log"
    with open(log, "wb") as out:
        start = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--temp-dir={root}", f"--port={gcs}",
             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
             f"--node-manager-port={node}", f"--object-manager-port={objm}",
             f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rtenv}",
             f"--metrics-export-port={metrics}",
             "--min-worker-port=0", "--max-worker-port=0",  # OS-chosen, like ray.init's
             "--num-cpus=8", "--include-dashboard=true", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", token, env)
    try:
        deadline = time.time() + 120
        while not _answers(f"{head.url}/api/jobs/", token):
            assert start.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield head
    finally:
        survivors = _stop_head(start, token_path)
        assert not survivors, survivors
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(600)
def test_job_submit_to_a_cluster_with_token_auth(auth_head, cache_dir, tmp_path):
    head = auth_head
    # Auth is on: the dashboard refuses a request without the token (401) or with another (403).
    assert _get(f"{head.url}/api/jobs/", None)[0] == 401
    assert _get(f"{head.url}/api/jobs/", secrets.token_hex(32))[0] == 403

    # `ray job submit` is refused without the token, and with it but without RAY_AUTH_MODE=token
    # (the client then sends none).
    bare = {k: v for k, v in head.env.items() if k not in AUTH_VARS}
    for env in (bare, bare | {"RAY_AUTH_TOKEN": head.token}):
        refused = subprocess.run([RAY, "job", "submit", "--address", head.url, "--", "true"],
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "Authentication required" in refused.stderr, refused.stderr[-3000:]

    # With RAY_AUTH_MODE=token and the token (here by value, RAY_AUTH_TOKEN) it runs. The job
    # inherits the head's environment, auth included, and joins the cluster via $RAY_ADDRESS.
    client = bare | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    out = tmp_path / "run"
    job_id = f"rlsys-test-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", head.url, "--submission-id", job_id,
         "--working-dir", ".", "--", "python", "-m", "rlsys.run", "conf=tiny",
         "trainer.steps=1", "trainer.eval_size=0", f"trainer.output_dir={out}",
         f"model.cache_dir={cache_dir}"],
        env=client, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=420)
    assert submit.returncode == 0, submit.stdout[-5000:]

    status, body = _get(f"{head.url}/api/jobs/{job_id}", head.token)
    assert status == 200, body
    assert json.loads(body)["status"] == "SUCCEEDED", body
    # The only job: the refused submission left nothing behind.
    jobs = json.loads(_get(f"{head.url}/api/jobs/", head.token)[1])
    assert [j["submission_id"] for j in jobs] == [job_id]

    # Its actors ran on this cluster (the driver joined $RAY_ADDRESS, no cluster of its own).
    status, body = _get(f"{head.url}/api/v0/actors?limit=1000", head.token)
    assert status == 200, body
    classes = {a["class_name"] for a in json.loads(body)["data"]["result"]["result"]}
    assert {"RolloutWorker", "RewardWorker", "Learner"} <= classes, classes

    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["step"] == 1 and "train/loss" in records[-1], records
    assert (out / "final" / "config.json").is_file()
