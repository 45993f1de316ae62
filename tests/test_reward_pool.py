"""RewardPool robustness: per-item verifier errors, dead workers and hung workers.

Failures are injected through RewardWorker's `parts`: the test reward parts are defined
*inside* the fixture, so cloudpickle ships them to the actors by value (a function defined at
module level here would be pickled by reference to this test module, which Ray's worker
processes cannot import). Each part reacts to a magic gold answer:

* "explode"          -> the `explode` part raises ValueError;
* "sleep:<s>"        -> the `nap` part sleeps <s> seconds (every time);
* "hang_once:<path>" -> the first call to claim <path> sleeps 60 s, later calls return at once,
                        so a retried chunk succeeds where the first attempt hung.
Every other gold is a number echoed by the `echo` part, which lets tests check result order.
"""

from __future__ import annotations

import threading
import time

import pytest

from actors.reward import RewardPool

PREFIX = "test-reward-pool"
WEIGHTS = {"echo": 1.0, "explode": 0.0, "nap": 0.0}


@pytest.fixture(scope="module")
def pool(ray_cluster):
    def echo(response: str, gold: str) -> float:
        try:
            return float(gold)
        except ValueError:
            return 0.0

    def explode(response: str, gold: str) -> float:
        if gold == "explode":
            raise ValueError("injected verifier failure")
        return 0.0

    def nap(response: str, gold: str) -> float:
        import os
        import time

        if gold.startswith("sleep:"):
            time.sleep(float(gold.removeprefix("sleep:")))
        elif gold.startswith("hang_once:"):
            try:  # O_EXCL: exactly one call, across processes, wins the right to hang
                os.close(os.open(gold.removeprefix("hang_once:"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return 0.0
            time.sleep(60)
        return 0.0

    p = RewardPool(2, WEIGHTS, num_cpus=0.1, timeout_s=20.0, name_prefix=PREFIX,
                   parts={"echo": echo, "explode": explode, "nap": nap})
    yield p
    p.shutdown()


def _check_echo(scores: list[dict[str, float]], golds: list[str], skip: set[int]) -> None:
    assert len(scores) == len(golds)
    for i, (s, g) in enumerate(zip(scores, golds, strict=True)):
        if i not in skip:
            assert s["echo"] == float(g) and s["total"] == float(g) and s["error"] == 0.0, i


def test_scores_in_order(pool, ray_cluster):
    golds = [str(i) for i in range(11)]
    scores = pool.score(["r"] * len(golds), golds)
    _check_echo(scores, golds, set())
    assert all(ray_cluster.get([w.in_main_thread.remote() for w in pool.workers]))
    assert pool.score([], []) == []


def test_one_item_raising_only_zeroes_that_item(pool):
    before = pool.pool_stats()
    golds = ["1", "2", "3", "explode", "5", "6"]
    scores = pool.score(["r"] * len(golds), golds)
    _check_echo(scores, golds, {3})
    assert scores[3] == {"total": 0.0, "echo": 0.0, "explode": 0.0, "nap": 0.0, "error": 1.0}
    after = pool.pool_stats()
    assert after["errors"] == before["errors"] + 1
    assert after["retries"] == before["retries"] and after["restarts"] == before["restarts"]


def test_worker_killed_mid_call_is_retried_and_restarted(pool, ray_cluster):
    before = pool.pool_stats()
    old = pool.workers[0]
    golds = ["sleep:3", "1", "2", "3", "4", "5"]  # chunk [0, 3) goes to worker 0
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(out=pool.score(["r"] * 6, golds)))
    t.start()
    time.sleep(1.0)  # worker 0 is now inside the 3 s sleep
    ray_cluster.kill(ray_cluster.get_actor(f"{PREFIX}-0"))
    t.join(timeout=30)
    assert not t.is_alive()
    _check_echo(box["out"], golds, {0})
    after = pool.pool_stats()
    assert after["restarts"] == before["restarts"] + 1
    assert after["retries"] == before["retries"] + 1
    # Replaced under the same name, and the new actor works.
    assert pool.workers[0]._actor_id != old._actor_id
    assert ray_cluster.get_actor(f"{PREFIX}-0")._actor_id == pool.workers[0]._actor_id
    assert ray_cluster.get(pool.workers[0].in_main_thread.remote(), timeout=30)


def test_hung_call_times_out_and_is_retried_elsewhere(pool, monkeypatch, tmp_path):
    monkeypatch.setattr(pool, "timeout_s", 2.0)
    before = pool.pool_stats()
    old = pool.workers[0]
    golds = [f"hang_once:{tmp_path / 'flag'}", "1", "2", "3", "4", "5"]
    t0 = time.monotonic()
    scores = pool.score(["r"] * len(golds), golds)
    assert time.monotonic() - t0 < 20  # nowhere near the 60 s hang
    _check_echo(scores, golds, {0})
    assert scores[0]["error"] == 0.0
    after = pool.pool_stats()
    assert after["retries"] == before["retries"] + 1
    assert after["restarts"] == before["restarts"] + 1
    assert pool.workers[0]._actor_id != old._actor_id


def test_gives_up_after_max_retries(pool, monkeypatch):
    monkeypatch.setattr(pool, "timeout_s", 2.0)
    monkeypatch.setattr(pool, "max_retries", 0)
    before = pool.pool_stats()
    golds = ["sleep:30", "1", "2", "3"]
    with pytest.raises(RuntimeError, match=r"2 of 4 completions could not be scored"):
        pool.score(["r"] * len(golds), golds)
    assert pool.pool_stats()["restarts"] == before["restarts"] + 1
    # The pool is usable again right away (the hung worker was replaced).
    monkeypatch.setattr(pool, "timeout_s", 20.0)
    _check_echo(pool.score(["r"] * 4, ["1", "2", "3", "4"]), ["1", "2", "3", "4"], set())


def test_per_task_weights_replace_the_default_ones(pool, ray_cluster):
    """A mixed-task run: each item is scored with its own task's weights."""
    from actors.reward import RewardWorker

    worker = RewardWorker({"accuracy": 1.0, "format": 1.0},
                          per_task={"short": {"accuracy": 2.0}})
    response = "<think>a</think><answer>4</answer>"
    scores = worker.score([response, response, "4"], ["4", "4", "4"], ["long", "short", "short"])
    assert scores[0] == {"total": 2.0, "accuracy": 1.0, "format": 1.0, "error": 0.0}
    assert scores[1] == {"total": 2.0, "accuracy": 2.0 / 2.0, "error": 0.0}
    assert scores[2] == {"total": 0.0, "accuracy": 0.0, "error": 0.0}
    # The pool hands the task names along with each chunk.
    mixed = RewardPool(1, {"echo": 1.0}, num_cpus=0.1, name_prefix=f"{PREFIX}-mixed",
                       per_task={"double": {"echo": 2.0}}, parts=pool._parts)
    try:
        out = mixed.score(["r"] * 4, ["1", "2", "3", "4"], ["", "double", "", "double"])
    finally:
        mixed.shutdown()
    assert [s["total"] for s in out] == [1.0, 4.0, 3.0, 8.0]
    with pytest.raises(ValueError, match="task names"):
        pool.score(["r"], ["1"], ["a", "b"])
