"""rlsys on real multi-node Ray clusters with token authentication on, as the README's
"Multi-node" section runs it, all raylets on this machine:
- a head started with `ray start --head` advertising the learner pool's resource and two
  raylets joined with `ray start --address=...` advertising the rollout pool's. Runs go through
  `ray job submit` and through $RAY_ADDRESS, with `rollout.resources` / `learner.resources`
  naming the pools, Ray's state API shows where every actor ran, and a rollout node is lost
  mid-run;
- a head running Ray's autoscaler with its fake multi-node provider (what Ray's own tests use:
  it starts and stops real raylets on this machine), which adds a rollout node when
  `python -m rlsys.scale` asks for more engines than fit and removes it once idle.

Each cluster is this module's own: its own temp dir, ports and token (a file named by
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

from rlsys.config import load_config
from rlsys.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # `ray` and the `python` the job's entrypoint runs
RAY = str(VENV_BIN / "ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class Head:
    url: str  # the dashboard, which serves the job and state APIs
    token: str
    env: dict[str, str]  # what the nodes were started with (auth on, token by path)
    gcs_address: str  # what $RAY_ADDRESS names to join the cluster
    pool_of: dict[str, str]  # node id -> its pool: learner_node (the head), rollout_node
    spare: subprocess.Popen[bytes]  # `ray start` of the second rollout node (one may die)


POOLS = ["rollout.resources={rollout_node: 1}", "learner.resources={learner_node: 1}"]


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


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`ray start --block ARGS` in a session of its own (so its processes can be killed as a
    group), output to `log`; each node gets its own OS-chosen ports."""
    node, objm, agent_http, agent_grpc, rtenv, metrics = _free_ports(6)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", *args, f"--node-manager-port={node}",
             f"--object-manager-port={objm}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rtenv}",
             f"--metrics-export-port={metrics}",
             "--min-worker-port=0", "--max-worker-port=0",  # OS-chosen, like ray.init's
             "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)


def _alive_nodes(url: str, token: str) -> list[dict]:
    try:
        status, body = _get(f"{url}/api/v0/nodes?limit=100", token)
    except OSError:
        return []
    if status != 200:
        return []
    return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]


@pytest.fixture(scope="module")
def auth_head() -> Iterator[Head]:
    """Three raylets from `ray start`, token authentication on: the head (8 logical CPUs,
    advertising learner_node) and two rollout nodes (4 CPUs and one rollout_node each)."""
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
    gcs, dash, client = _free_ports(3)
    started = [_ray_start(
        ["--head", f"--temp-dir={root}", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", "--num-cpus=8", "--include-dashboard=true",
         '--resources={"learner_node": 1}'], env, root / "head.log")]
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while not _answers(f"{url}/api/jobs/", token):
            assert started[0].poll() is None, (root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(1)
        pool_of: dict[str, str] = {}
        for name in ("node", "spare"):  # one at a time: two raylets starting at once on 2
            log = root / f"{name}.log"  # busy cores can miss Ray's startup timeout
            started.append(_ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=4",
                                       '--resources={"rollout_node": 1}'], env, log))
            while len(pool_of) < len(started):
                assert started[-1].poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
                pool_of = {n["node_id"]: pool for n in _alive_nodes(url, token)
                           for pool in ("learner_node", "rollout_node")
                           if pool in n["resources_total"]}
        yield Head(url, token, env, f"127.0.0.1:{gcs}", pool_of, started[2])
    finally:
        for start in started[1:]:  # the rollout nodes first (SIGTERM stops a raylet) ...
            start.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                start.wait(timeout=30)
        survivors = _stop_head(started[0], token_path)  # ... then all the cluster has left
        assert not survivors, survivors
        shutil.rmtree(root, ignore_errors=True)


def _placement(head: Head) -> dict[str, set[str]]:
    """Pools (by resource name; "?" for any other node) each actor class has run on."""
    status, body = _get(f"{head.url}/api/v0/actors?limit=1000", head.token)
    assert status == 200, body
    pool_of = head.pool_of
    where: dict[str, set[str]] = {}
    for actor in json.loads(body)["data"]["result"]["result"]:
        where.setdefault(actor["class_name"], set()).add(pool_of.get(actor["node_id"], "?"))
    return where


def _assert_ran_on_pools(head: Head, out: Path, steps: int) -> None:
    where = _placement(head)
    assert where.get("RolloutWorker") == {"rollout_node"}, where
    assert where.get("Learner") == {"learner_node"}, where
    assert "RewardWorker" in where, where
    # Every step's weights reached the engines across nodes, each version confirmed.
    records = read_metrics(out / "metrics.jsonl")
    assert [r["weight_version"] for r in records if r["step"] > 0] == list(
        range(1, steps + 1)), records


def _autoscaling_config(gcs_address: str) -> dict:
    """The autoscaler's cluster config for the fake multi-node provider: the head (learner
    pool) and up to two rollout nodes, one kept, an idle one removed after 3 s. (The provider's
    example.yaml, which Ray's AutoscalingCluster reads, is not in the wheel; and that helper
    runs `ray stop --force`, which would stop the session's cluster too.)"""
    return {
        "cluster_name": "rlsys-autoscale", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 4, "learner_node": 1},
                                 "node_config": {}, "max_workers": 0},
            "rollout": {"resources": {"CPU": 2, "rollout_node": 1}, "node_config": {},
                        "min_workers": 1, "max_workers": 2}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


@pytest.mark.timeout(600)
def test_autoscaler_adds_a_rollout_node_for_more_engines_and_removes_it_when_idle(
        cache_dir, tmp_path):
    """One engine on the one rollout node there is; `python -m rlsys.scale --rollout-workers 2`
    asks for an engine that fits nowhere: the run goes on with one while the autoscaler adds a
    rollout node, the new engine starts there, receives the current weights and samples;
    `--rollout-workers 1` removes an engine and the autoscaler then removes its idle node."""
    root = Path(tempfile.mkdtemp(prefix="rlsys-as-"))
    token = secrets.token_hex(32)
    token_path = root / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs, dash, client = _free_ports(3)
    config = root / "autoscaler.json"
    config.write_text(json.dumps(_autoscaling_config(f"127.0.0.1:{gcs}")))
    env = {k: v for k, v in os.environ.items() if k not in (*AUTH_VARS, "RAY_ADDRESS")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head = _ray_start(["--head", f"--temp-dir={root}", f"--port={gcs}",
                       f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                       "--num-cpus=4", '--resources={"learner_node": 1}',
                       "--include-dashboard=true", f"--autoscaling-config={config}"],
                      env, root / "head.log")
    url = f"http://127.0.0.1:{dash}"
    # The run's output goes to a file, which a failed wait shows while the run still runs.
    run, run_log = None, root / "run.log"
    try:
        def rollout_nodes() -> list[str]:
            return [n["node_id"] for n in _alive_nodes(url, token)
                    if "rollout_node" in n["resources_total"]]

        def wait_for(condition, what: str, timeout_s: float = 240) -> None:
            deadline = time.time() + timeout_s
            while not condition():
                assert head.poll() is None, (root / "head.log").read_text()[-3000:]
                assert run is None or run.poll() is None, run_log.read_text()[-5000:]
                assert time.time() < deadline, (f"timed out waiting for {what}; the run's "
                                                f"log ends:\n{run_log.read_text()[-5000:]}")
                time.sleep(0.5)

        wait_for(lambda: len(rollout_nodes()) == 1, "the autoscaler's first rollout node")
        first_node = rollout_nodes()[0]
        out = tmp_path / "run"
        metrics = out / "metrics.jsonl"
        client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        client_env |= {"RAY_ADDRESS": f"127.0.0.1:{gcs}", "RAY_AUTH_TOKEN": token}
        with run_log.open("w") as log_file:  # the run writes to its own copy of the handle
            run = subprocess.Popen(
                [sys.executable, "-m", "rlsys.run", "conf=tiny", "trainer.steps=1000",
                 "algorithm.dynamic_sampling=false",
                 "trainer.eval_size=0", "trainer.save_final=false", f"trainer.output_dir={out}",
                 f"model.cache_dir={cache_dir}", *POOLS],
                env=client_env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True)

        def logged(condition) -> bool:
            return metrics.exists() and any(condition(r) for r in read_metrics(metrics))

        def scale(n: int) -> None:
            done = subprocess.run([sys.executable, "-m", "rlsys.scale", "--rollout-workers",
                                   str(n)], env=client_env, cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr

        wait_for(lambda: logged(lambda r: r["step"] == 2), "step 2")
        scale(2)
        # The run does not wait for the node: steps go on with one engine meanwhile.
        wait_for(lambda: logged(lambda r: r.get("rollout/engines_starting") == 1),
                 "a step with the new engine waiting for its node")
        wait_for(lambda: logged(lambda r: r.get("rollout/engines") == 2),
                 "a step on two engines", timeout_s=300)
        nodes = rollout_nodes()
        assert len(nodes) == 2 and first_node in nodes
        status, body = _get(f"{url}/api/v0/actors?limit=1000", token)
        assert status == 200, body
        engines = [a for a in json.loads(body)["data"]["result"]["result"]
                   if a["class_name"] == "RolloutWorker" and a["state"] == "ALIVE"]
        assert sorted(a["node_id"] for a in engines) == sorted(nodes)  # one on each
        joined = min(r["step"] for r in read_metrics(metrics) if r.get("rollout/engines") == 2)
        scale(1)
        wait_for(lambda: logged(lambda r: r["step"] > joined and r["rollout/engines"] == 1),
                 "a step on one engine again")
        wait_for(lambda: len(rollout_nodes()) == 1, "the idle rollout node to be removed")
        run.send_signal(signal.SIGTERM)  # what `ray job stop` sends
        output, _ = run.communicate(timeout=120)
        assert run.returncode == 130, output[-5000:]
        records = [r for r in read_metrics(metrics) if r["step"] > 0]
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        # Every step's broadcast reached every engine of the step, the new one included.
        assert [r["weight_version"] for r in records] == [r["step"] for r in records]
        tiny = load_config(["conf=tiny"]).rollout
        assert all(r["rollout/samples"] == tiny.prompts_per_step * tiny.group_size
                   for r in records)
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        survivors = _stop_head(head, token_path)
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, survivors


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
         f"model.cache_dir={cache_dir}", *POOLS],
        env=client, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=420)
    assert submit.returncode == 0, submit.stdout[-5000:]

    status, body = _get(f"{head.url}/api/jobs/{job_id}", head.token)
    assert status == 200, body
    assert json.loads(body)["status"] == "SUCCEEDED", body
    # The only submitted job: the refused submission left nothing behind.
    jobs = json.loads(_get(f"{head.url}/api/jobs/", head.token)[1])
    assert [j["submission_id"] for j in jobs if j.get("type") == "SUBMISSION"] == [job_id]

    # Its actors ran on this cluster (the driver joined $RAY_ADDRESS, no cluster of its own),
    # each on its pool's node.
    _assert_ran_on_pools(head, out, steps=1)
    records = read_metrics(out / "metrics.jsonl")
    assert "train/loss" in records[-1], records
    assert (out / "final" / "config.json").is_file()


@pytest.mark.timeout(420)
def test_run_joins_a_cluster_through_ray_address(auth_head, cache_dir, tmp_path):
    """`RAY_ADDRESS=... python -m rlsys.run` (no job API): the driver joins the cluster, the
    engines land on the rollout node, the learner on the learner node, and the weights cross
    between them every step."""
    head = auth_head
    out = tmp_path / "run"
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env |= {"RAY_ADDRESS": head.gcs_address, "RAY_AUTH_TOKEN": head.token}
    run = subprocess.run(
        [sys.executable, "-m", "rlsys.run", "conf=tiny", "trainer.steps=2",
         "trainer.eval_size=0", "trainer.save_final=false", f"trainer.output_dir={out}",
         f"model.cache_dir={cache_dir}", *POOLS],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=360)
    assert run.returncode == 0, run.stdout[-5000:]
    _assert_ran_on_pools(head, out, steps=2)


def _lose_node(start: subprocess.Popen[bytes]) -> None:
    """What a machine failure does to a node: its raylet and every process under it (workers
    included, whose process groups are their own) die at once, with no chance to clean up."""
    root = psutil.Process(start.pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.timeout(600)
def test_losing_a_rollout_node_mid_run(auth_head, cache_dir, tmp_path):
    """Two engines, one on each rollout node. After step 2 the spare node is lost (SIGKILL to
    its raylet and all its processes): the dead engine's prompts run again on the other, the
    weight-sync group is re-formed without it, and its replacement waits for rollout capacity
    (none is left) while the run goes on with one engine to its last step. Runs last in the
    module: the cluster has one rollout node fewer afterwards."""
    head = auth_head
    out = tmp_path / "run"
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env |= {"RAY_ADDRESS": head.gcs_address, "RAY_AUTH_TOKEN": head.token}
    steps = 8
    run = subprocess.Popen(
        [sys.executable, "-m", "rlsys.run", "conf=tiny", f"trainer.steps={steps}",
         "rollout.num_workers=2", "algorithm.dynamic_sampling=false", "trainer.eval_size=0",
         "trainer.save_final=false", f"trainer.output_dir={out}",
         f"model.cache_dir={cache_dir}", *POOLS],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and 2 in [r["step"] for r in read_metrics(metrics)]):
        assert run.poll() is None and time.time() < deadline, run.stdout.read()[-5000:]
        time.sleep(0.2)
    _lose_node(head.spare)
    output, _ = run.communicate(timeout=420)
    assert run.returncode == 0, output[-5000:]
    assert "rollout engine(s) ['rollout-" in output and "died; 1 left" in output, output[-5000:]

    records = [r for r in read_metrics(metrics) if r["step"] > 0]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    tiny = load_config(["conf=tiny"]).rollout
    for r in records:  # nothing lost: every step trained on B whole groups
        assert r["rollout/samples"] == tiny.prompts_per_step * tiny.group_size, r["step"]
        assert r["groups/trained"] == tiny.prompts_per_step, r["step"]
    assert records[0]["rollout/engines"] == 2 and records[-1]["rollout/engines"] == 1
    assert records[-1]["rollout/engine_restarts"] == 1
    # The replacement was still waiting for a rollout node when the run ended.
    assert records[-1]["rollout/engines_starting"] == 1
    assert records[-1]["weight_version"] == steps

