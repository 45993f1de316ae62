"""The learner group: tp x dp `Learner` ranks as Ray actors on one placement group.

The group reserves one bundle per rank (a GPU each on a cluster, CPUs here) as a single placement
group, so the whole world is scheduled at once or waits as a whole (an autoscaler sees one
request); picks the rendezvous address on the node of rank 0; and starts rank r as actor
`learner-dp{r // tp}-tp{r % tp}`. Those actors form one torch.distributed world (NCCL on GPUs,
gloo on CPU) with a ("dp", "tp") device mesh (see learners/parallel.py).

The driver talks only to the group: `train_step(batch)` splits the batch over the dp ranks
(whole prompt groups, balanced by tokens; tensor-parallel ranks of one dp index get the same
shard), runs the update on every rank, and combines their metrics into the batch's.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learners.learner import Learner, combine_rank_metrics
from rlsys import weight_sync
from rlsys.config import AlgorithmConfig, LearnerConfig
from rlsys.ray_errors import ACTOR_LOST


def shard_for_data_parallel(prompt_ids: list[list[int]], response_ids: list[list[int]],
                            dp: int) -> list[list[int]]:
    """Split completion indices into `dp` shards of about equal tokens.

    Completions of one prompt stay together when the shards can be balanced without splitting
    them (the learner packs each prompt once per micro-batch); groups are split in halves only
    while there are fewer groups than ranks. Greedy longest-first assignment to the lightest
    shard keeps every shard within one group of the mean.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p), []).append(i)
    units = list(by_prompt.values())

    def cost(unit: list[int]) -> int:
        return len(prompt_ids[unit[0]]) + sum(len(response_ids[i]) for i in unit)

    while len(units) < dp and any(len(u) > 1 for u in units):
        widest = max((u for u in units if len(u) > 1), key=cost)
        units.remove(widest)
        half = len(widest) // 2
        units += [widest[:half], widest[half:]]
    shards: list[list[int]] = [[] for _ in range(dp)]
    loads = [0] * dp
    for unit in sorted(units, key=cost, reverse=True):
        lightest = loads.index(min(loads))
        shards[lightest] += unit
        loads[lightest] += cost(unit)
    return [sorted(s) for s in shards]


def _rendezvous_address() -> tuple[str, int]:
    addr = ray.util.get_node_ip_address()
    return addr, weight_sync.find_free_port(addr)


class LearnerFailed(RuntimeError):
    """A learner rank's actor died (its process was killed, its node lost): the update it was
    part of cannot complete, and the group's state is gone with it."""

    def __init__(self, rank: int, name: str, cause: BaseException) -> None:
        first_line = (str(cause).splitlines() or [type(cause).__name__])[0]
        super().__init__(f"learner rank {rank} ({name}) died: {first_line}")
        self.rank, self.name = rank, name


class LearnerGroup:
    """tp x dp learner actors; every method runs on all of them (the methods are collective)."""

    def __init__(self, model_path: str, learner: LearnerConfig, algorithm: AlgorithmConfig, *,
                 temperature: float, max_response_len: int, seed: int,
                 runtime_env: dict | None = None, teacher_path: str | None = None,
                 total_steps: int = 0) -> None:
        self.tp, self.dp = learner.tp, learner.dp
        world = self.tp * self.dp
        # learner.resources (Ray custom resources, e.g. the learner nodes' own) go into every
        # bundle, so the whole group lands where they are advertised.
        bundle = {"CPU": learner.num_cpus} | ({"GPU": learner.num_gpus}
                                              if learner.num_gpus else {}) | learner.resources
        # PACK keeps a tensor-parallel group on as few nodes as the cluster allows.
        self.placement_group = placement_group([bundle] * world, strategy="PACK")
        ray.get(self.placement_group.ready())

        def on_bundle(index: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement_group,
                                                    placement_group_bundle_index=index)

        addr, port = ray.get(ray.remote(num_cpus=0)(_rendezvous_address).options(
            scheduling_strategy=on_bundle(0)).remote())
        actor = ray.remote(Learner)
        self.workers = [
            actor.options(name=f"learner-dp{rank // self.tp}-tp{rank % self.tp}",
                          num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
                          resources=dict(learner.resources),
                          scheduling_strategy=on_bundle(rank), runtime_env=runtime_env,
                          ).remote(model_path, learner, algorithm, temperature=temperature,
                                   max_response_len=max_response_len, seed=seed, rank=rank,
                                   master_addr=addr, master_port=port,
                                   teacher_path=teacher_path, total_steps=total_steps)
            for rank in range(world)]
        # Construction includes the process-group rendezvous: all ranks come up together.
        ray.get([w.__ray_ready__.remote() for w in self.workers])

    @property
    def rank0(self) -> ray.actor.ActorHandle:
        return self.workers[0]

    @property
    def names(self) -> list[str]:
        return [f"learner-dp{rank // self.tp}-tp{rank % self.tp}"
                for rank in range(len(self.workers))]

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self.gather([getattr(w, method).remote(*args) for w in self.workers])

    def gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """Every rank's result; `LearnerFailed` as soon as one rank's actor has died.

        Waiting on all refs at once would not do: the live ranks block in a collective with
        the dead one and only give up when the process group times out, many minutes later.
        """
        results: dict[ray.ObjectRef, Any] = {}
        pending = list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ready] = ray.get(ready)
            except ACTOR_LOST as exc:
                rank = refs.index(ready)
                raise LearnerFailed(rank, self.names[rank], exc) from None
        return [results[ref] for ref in refs]

    def train_step(self, batch: dict[str, list], entropy_coef: float | None = None,
                   temperature: float | None = None) -> dict[str, float]:
        """One GRPO update of the whole batch; returns the batch's metrics. `entropy_coef`
        overrides algorithm.entropy_coef (the trainer's adaptive weight), `temperature` the
        learner's sampling temperature (the batch's, under rollout.temperature_warmup_steps)."""
        return self._update("train_step", batch, entropy_coef, temperature)

    def sft_step(self, batch: dict[str, list]) -> dict[str, float]:
        """One supervised (next-token) update on prompt/response pairs; the batch's metrics."""
        return self._update("sft_step", batch)

    def _update(self, method: str, batch: dict[str, list], *args: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        shards = shard_for_data_parallel(batch["prompt_ids"], batch["response_ids"], self.dp)
        refs = []
        for rank, worker in enumerate(self.workers):
            shard = shards[rank // self.tp]
            refs.append(getattr(worker, method).remote(
                {key: [values[i] for i in shard] for key, values in batch.items()}, *args))
        per_rank = self.gather(refs)
        metrics = combine_rank_metrics(per_rank[:: self.tp])  # one report per dp index
        metrics["tokens_per_s"] = metrics.pop("seq_tokens") / (time.perf_counter() - t0)
        return metrics

    def compute_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                         reference: bool = False, temperature: float | None = None
                         ) -> list[list[float]]:
        """Per-token log-probs of each response under the policy (or the reference model),
        at `temperature` (None: the learner's), in the order given: sharded over the dp ranks
        like `train_step`, merged back."""
        shards = shard_for_data_parallel(prompt_ids, response_ids, self.dp)
        refs = []
        for rank, worker in enumerate(self.workers):
            shard = shards[rank // self.tp]
            refs.append(worker.compute_logprobs.remote([prompt_ids[i] for i in shard],
                                                       [response_ids[i] for i in shard],
                                                       reference, temperature))
        per_rank = self.gather(refs)
        result: list[list[float]] = [[] for _ in response_ids]
        for shard, logprobs in zip(shards, per_rank[:: self.tp], strict=True):
            for i, lp in zip(shard, logprobs, strict=True):
                result[i] = lp
        return result

    def update_reference(self) -> None:
        self._all("update_reference")

    def save_checkpoint(self, path: str) -> None:
        self._all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> int:
        return self._all("load_checkpoint", path)[0]

    def save_pretrained(self, path: str) -> str:
        return self._all("save_pretrained", path)[0]

    # --- weight sync: rank 0 is the group's member of the engines' weight-sync group --------

    def weight_manifest(self, dtype: str) -> weight_sync.WeightManifest:
        return ray.get(self.rank0.weight_manifest.remote(dtype))

    def host_weight_sync(self) -> tuple[str, int]:
        return ray.get(self.rank0.host_weight_sync.remote())

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int,
                         backend: str) -> list[ray.ObjectRef]:
        """Refs to wait on together with the engines' (the group forms when all have joined)."""
        return [self.rank0.init_weight_sync.remote(master_addr, master_port, world_size,
                                                   backend)]

    def close_weight_sync(self) -> list[ray.ObjectRef]:
        """Refs to wait on together with the engines' (every member leaves the group)."""
        return [self.rank0.close_weight_sync.remote()]

    def broadcast_weights(self, manifest: weight_sync.WeightManifest, bucket_bytes: int,
                          mode: str = "full") -> list[ray.ObjectRef]:
        """Refs of every rank's part (gathering shards); rank 0's result holds the figures."""
        return [w.broadcast_weights.remote(manifest, bucket_bytes, mode) for w in self.workers]

    def stage_weights(self) -> float:
        """Cast the weights for the next sync now (see Learner.stage_weights; train_step does
        it with learner.stage_weights); the slowest rank's seconds."""
        return max(self._all("stage_weights"))

    def weight_digests(self, manifest: weight_sync.WeightManifest) -> list[str]:
        """Hashes of the weights the engines should hold (see Learner.weight_digests)."""
        return ray.get([w.weight_digests.remote(manifest) for w in self.workers])[0]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement_group)
