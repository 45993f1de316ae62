"""Continuous generation on one vLLM engine, with weight updates between decode steps.

`EngineStream` drives the engine's own step loop (`LLMEngine.step`) on a background thread of
the rollout actor. Requests (a prompt and its n samples: one GRPO group) are added at any time
and come back, all n together, as soon as the last of them finishes; the engine never drains
between training steps.

Everything else that touches the engine (a weight update, a batch `generate`) first takes it
with `pause()`, which stops the loop between two decode steps and holds it until done. A weight
update made while sequences are running (`RolloutWorker.update_weights`) then labels the new
weights with vLLM's own weight version and resets the prefix cache with
`reset_running_requests=True`: vLLM preempts the running sequences and recomputes their KV cache
under the new weights (prompt plus the tokens generated so far, prefilled again), so every later
token is sampled from exactly the new policy given its whole prefix, and its log-prob is the
new policy's. No sequence is finished early or thrown away. vLLM records which version sampled
which span of each completion; `token_versions` spells that out per token.

Sampling seeds: a preempted request's seeded generator would restart its random stream from
the seed, so streamed requests are unseeded (continuous generation is not reproducible
anyway: which tokens an update splits depends on timing).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


class EngineStream:
    """The step loop of one engine and the groups it has finished (see the module docstring)."""

    def __init__(self, llm: Any, lock: threading.Lock, name: str, version: int) -> None:
        self.llm, self.engine, self.lock, self.name = llm, llm.llm_engine, lock, name
        self._cond = threading.Condition()  # guards everything below
        self._finished: list[dict[str, Any]] = []
        self._in_flight: set[str] = set()
        self._pausers = 0
        self._stop = False
        self._error: BaseException | None = None
        # Seconds the loop spent stepping, and since when it exists: idle is the rest (nothing
        # to do, or held by a pause such as a weight update).
        self.busy_s, self.started = 0.0, time.perf_counter()
        self.tokens = 0  # tokens of the finished groups
        self.steps = 0  # engine steps taken
        self.engine.set_weight_version(str(version))
        self._thread = threading.Thread(target=self._run, name=f"{name}-stream", daemon=True)
        self._thread.start()

    # --- the caller's side (the actor's thread) ---------------------------------------------

    def add(self, requests: list[dict[str, Any]]) -> None:
        """Start requests: each {"id", "prompt", "n", "sampling": {temperature, top_p,
        max_tokens, stop}}. An id must not be in flight already."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._raise_if_failed()
        with self.pause():
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
        with self.pause():
            running = [i for i in ids if i in self._in_flight]
            if running:
                self.engine.abort_request(running)
            with self._cond:
                self._in_flight.difference_update(ids)
                self._finished = [g for g in self._finished if g["id"] not in set(ids)]

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Hold the engine between two decode steps until the block ends."""
        with self._cond:
            self._pausers += 1
        try:
            with self.lock:
                yield
        finally:
            with self._cond:
                self._pausers -= 1
                self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {"in_flight": float(len(self._in_flight)),
                    "finished_waiting": float(len(self._finished)),
                    "busy_s": self.busy_s, "wall_s": time.perf_counter() - self.started,
                    "tokens": float(self.tokens), "steps": float(self.steps)}

    def close(self) -> None:
        """Stop the loop and drop every request in flight."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        with self.lock:
            if self._in_flight:
                self.engine.abort_request(list(self._in_flight))
        self._in_flight.clear()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self.name}: the generation loop failed: "
                               f"{self._error!r}") from self._error

    # --- the loop (its own thread) ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    # Wait while someone holds (or waits for) the engine, or there is no work.
                    while not self._stop and (self._pausers or not self._in_flight):
                        self._cond.wait()
                    if self._stop:
                        return
                with self.lock:
                    start = time.perf_counter()
                    outputs = self.engine.step()
                    elapsed = time.perf_counter() - start
                groups = [_group(o) for o in outputs if o.finished]
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
        except BaseException as exc:  # the caller sees it at its next add or take
            with self._cond:
                self._error = exc
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
