"""Weight-sync methods grafted onto vLLM's worker.

vLLM mixes `worker_extension_cls` into its worker class (`vllm/v1/worker/worker_base.py`,
`WorkerWrapperBase.init_worker`), so these methods run with `self` being the worker: they can
reach `self.model_runner`, `self.device`, `self.rank` and `self.reload_weights`. They are called
by name through `LLM.collective_rpc("name", args=...)`, which carries only picklable data —
tensors cannot go through it (FACTS.md), so the weights come over our own process group.

Names must not clash with the worker's own attributes (vLLM asserts this at start): the worker
already has `update_weights` and `reload_weights`, hence `receive_weights` here.
"""

from __future__ import annotations

import logging
import time

import torch

from actors.engine_weights import EngineWeights
from rlsys.weight_sync import (
    WeightManifest,
    WeightReceiver,
    close_weight_sync_group,
    init_weight_sync_group,
    receive_weights,
    single_threaded,
)

logger = logging.getLogger(__name__)


class _ExpectedReloadWarnings(logging.Filter):
    """Drop the two warnings every in-place reload prints for layers that get no weights.

    The rotary embedding has no weights, and a tied lm_head's weight is the embedding's (it is
    re-packed below); vLLM warns about both on every update, which would bury real warnings.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith("Failed to load weights")
                    and message.startswith(("RotaryEmbedding", "ParallelLMHead")))


def _quiet_expected_reload_warnings() -> None:
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _ExpectedReloadWarnings) for f in handler.filters):
            handler.addFilter(_ExpectedReloadWarnings())


def _repack_kept_cpu_weights(model: torch.nn.Module) -> int:
    """Rebuild the CPU GEMM kernels of layers that keep their weight next to a packed copy.

    On CPU, vLLM packs each linear weight into a kernel-specific copy (`layer.cpu_linear`,
    `vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm`). `reload_weights`
    re-runs that packing for every layer that received weights, but a tied `lm_head` receives
    none (Llama's `load_weights` skips `lm_head.weight` when embeddings are tied): its weight is
    the embedding's, updated in place, while its packed copy still holds the old values, so
    logits would come from stale weights. Layers packed with `remove_weight=False` (the
    vocabulary layers) still hold the real weight, so re-packing from it is always correct;
    linear layers dropped their weight (`remove_weight=True`) and were re-packed by the reload.
    Returns how many layers were re-packed. On GPUs no layer has `cpu_linear`: a no-op.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    repacked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor)
                and weight.dim() == 2 and weight.numel() > 0 and not weight.is_meta):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            repacked += 1
    return repacked


class WeightSyncExtension:
    """Joins the learner's weight-sync group and reloads broadcast weights in place."""

    def init_weight_sync(self, master_addr: str, master_port: int, rank: int, world_size: int,
                         backend: str) -> int:
        """Join the group; returns this worker's rank in it.

        `rank` is the group rank of the engine's first worker: with tensor parallelism every
        worker of the engine needs the full weights (vLLM's loaders shard them), so worker k of
        the engine joins as `rank + k`, and the caller sizes the world accordingly.
        """
        group_rank = rank + self.rank
        self._weight_sync_group = init_weight_sync_group(
            backend, master_addr, master_port, group_rank, world_size)
        self._weight_version = getattr(self, "_weight_version", 0)
        return group_rank

    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (before the pool re-forms it at another size).

        The weights and their version stay: the engine keeps serving them until the next
        `receive_weights` over the new group.
        """
        close_weight_sync_group(getattr(self, "_weight_sync_group", None))
        self._weight_sync_group = None

    def receive_weights(self, manifest: WeightManifest, bucket_bytes: int, version: int,
                        mode: str = "full") -> int:
        """Receive one broadcast (`mode` "full" or "delta") into the running model; returns
        `version`.

        Directly where `EngineWeights` can map the model (see actors/engine_weights.py): each
        bucket lands in a reused buffer and is copied (or its delta applied) into place while
        the next one is on the wire, and only layers with packed CPU kernels are re-packed.
        Otherwise through vLLM's generic `Worker.reload_weights(weights_iterator=...)`
        (`vllm/model_executor/model_loader/reload/inplace.py`), which takes checkpoint-format
        names, re-runs each layer's post-load processing and copies results into the existing
        storage, so CUDA graphs stay valid; `model.load_weights` alone is not enough on CPU:
        packed linear layers have an empty `.weight` there (FACTS.md).
        """
        group = getattr(self, "_weight_sync_group", None)
        if group is None:
            raise RuntimeError("receive_weights called before init_weight_sync")
        if mode not in ("full", "delta"):
            raise ValueError(f"mode must be 'full' or 'delta', got {mode!r}")
        start = time.perf_counter()
        plan = self._engine_weights(manifest, bucket_bytes)
        if plan is not None:
            from vllm.config import set_current_vllm_config

            receiver = self._weight_receiver
            with set_current_vllm_config(self.vllm_config):
                if mode == "full":
                    # Loading overlaps the wire, whose threads need the cores too.
                    with single_threaded(self.device):
                        repacked = plan.load_full(receiver.receive_full(group))
                else:  # a delta is small: applying it and re-packing is the work, on all cores
                    repacked = plan.load_delta(receiver.receive_delta(group))
            wait_s = receiver.wait_s
        elif mode == "delta":
            raise RuntimeError(f"delta sync needs direct loading, which this engine cannot do: "
                               f"{self._engine_weights_reason}")
        else:
            _quiet_expected_reload_warnings()
            self.reload_weights(weights_iterator=receive_weights(
                group, manifest, bucket_bytes, device=self.device))
            repacked = _repack_kept_cpu_weights(self.model_runner.get_model())
            wait_s = 0.0  # receiving and loading interleave inside vLLM's loader
        seconds = time.perf_counter() - start
        self._weight_version = version
        self._weight_sync_stats = {
            "version": version, "mode": mode, "direct": plan is not None,
            "seconds": seconds, "wait_s": wait_s, "load_s": seconds - wait_s,
            "repacked_layers": repacked,
        }
        logger.info("weights v%d loaded: %s", version, self._weight_sync_stats)
        return version

    def _engine_weights(self, manifest: WeightManifest, bucket_bytes: int
                        ) -> EngineWeights | None:
        """The direct-loading plan for this manifest (made once), or None (the reason is kept)."""
        key = (manifest, bucket_bytes)
        if getattr(self, "_engine_weights_key", None) != key:
            from vllm.distributed import get_tensor_model_parallel_world_size

            plan, reason = EngineWeights.plan(self.model_runner.get_model(), manifest,
                                              bucket_bytes, get_tensor_model_parallel_world_size())
            if plan is None:
                logger.warning("weights load through vLLM's generic reload: %s", reason)
            self._engine_weights_plan, self._engine_weights_reason = plan, reason
            self._weight_receiver = WeightReceiver(manifest, bucket_bytes, self.device,
                                                   full_buffers=plan.buckets if plan else None)
            self._engine_weights_key = key
        return self._engine_weights_plan

    def weight_digests(self) -> list[str]:
        """Per manifest tensor, a hash of the values this engine holds (direct loading only)."""
        plan = getattr(self, "_engine_weights_plan", None)
        if plan is None:
            raise RuntimeError("weight_digests needs a direct-loading sync first")
        return plan.digests(self._weight_receiver.manifest)

    def weight_sync_stats(self) -> dict[str, float]:
        """Timings of the last `receive_weights`, for the trainer's sync-stage metrics."""
        return dict(getattr(self, "_weight_sync_stats", {}))

    def weight_version(self) -> int:
        return getattr(self, "_weight_version", 0)
