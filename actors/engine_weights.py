"""Where each broadcast tensor lives in a running vLLM model, and loading it there directly.

vLLM's generic path for new weights (`Worker.reload_weights`) restores every layer to its
checkpoint form, runs the model's loader into freshly allocated tensors, re-runs every layer's
post-load processing and copies the results back: 93% of an engine's sync time on CPU
(benchmarks/README.md). `EngineWeights` does the same job with a plan made once per manifest:

- each manifest (Hugging Face) tensor maps to a view of the storage it lands in: a slice of a
  vLLM parameter (`q_proj` → rows of the fused `qkv_proj`, by the model's own
  `packed_modules_mapping`), or, for a layer whose post-load processing replaced its weight by a
  kernel-specific packed copy (vLLM's CPU GEMMs), a slice of an unpacked weight kept here;
- loading copies received values into those views (or applies a delta to them), then re-runs
  the post-load processing of only the layers that need it (those holding packed copies) and
  whose values changed. On GPUs no layer needs it: the parameters are the storage.

The views also are what the engine holds, which a delta sync patches in place and the tests
read back (`digests`). A model the plan cannot map (engine tensor parallelism, renamed or
reshaped checkpoint tensors, another dtype) gets `None` with the reason, and its engine keeps
vLLM's generic path, where a delta sync is not possible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from rlsys.weight_delta import apply_delta
from rlsys.weight_sync import WeightManifest, digests, dtype_from_name, full_layout


class EngineWeights:
    """The plan for one model and manifest; see the module docstring."""

    def __init__(self, views: list[torch.Tensor], repack: list[list[torch.nn.Module]],
                 unpacked: dict[torch.nn.Module, torch.Tensor],
                 buckets: list[torch.Tensor]) -> None:
        self.views = views            # per manifest entry: the storage it is written into
        self.repack = repack          # per manifest entry: layers to re-process when it changes
        self.unpacked = unpacked      # layer → its full weight, kept for layers vLLM packed
        self.buckets = buckets        # where full syncs land, or [] (reused buffers)
        # layer → the last manifest entry it is made of: once past it, it can be re-packed
        self.last = {id(layer): index for index, layers in enumerate(repack) for layer in layers}

    @classmethod
    def plan(cls, model: torch.nn.Module, manifest: WeightManifest, bucket_bytes: int,
             tp_size: int = 1) -> tuple[EngineWeights | None, str]:
        """(plan, "") or (None, why the model cannot be loaded directly)."""
        if tp_size != 1:
            return None, f"engine tensor parallelism {tp_size} shards the weights"
        mapping = getattr(model, "packed_modules_mapping", {}) or {}
        shard_of = {sub: (fused, i) for fused, subs in mapping.items()
                    for i, sub in enumerate(subs)}
        # First pass: where each entry goes (module, attribute, shard number).
        targets = []
        for name, shape, dtype in manifest:
            *path, attr = name.split(".")
            shard = None
            if path and path[-1] in shard_of:
                path[-1], shard = shard_of[path[-1]]
            try:
                module = model.get_submodule(".".join(path))
            except AttributeError:
                return None, f"no module for {name!r}"
            param = getattr(module, attr, None)
            if not isinstance(param, torch.Tensor):
                return None, f"no tensor for {name!r}"
            if param.dtype != dtype_from_name(dtype):
                return None, f"{name!r} is {param.dtype} in the engine, {dtype} on the wire"
            targets.append((module, attr, shard, shape))
        # Rows of each fused tensor, in shard order.
        rows: dict[tuple[int, str], dict[int, int]] = {}
        for module, attr, shard, shape in targets:
            if shard is not None:
                rows.setdefault((id(module), attr), {})[shard] = shape[0] if shape else 1
        unpacked: dict[torch.nn.Module, torch.Tensor] = {}
        views, repack = [], []
        by_storage = _packed_users(model)
        layout = full_layout(manifest, bucket_bytes)
        packed = [hasattr(t[0], "cpu_linear") and t[1] == "weight" and
                  getattr(t[0], t[1]).numel() == 0 for t in targets]
        # Full syncs land in buffers kept for good when some layer is packed: its full weight
        # is then, where its shards lie back to back in one bucket, a view of that bucket,
        # written by the wire itself (no copy). Without packed layers (GPUs) buckets rotate.
        buckets = ([torch.empty(total, dtype=torch.uint8, device=_device(model))
                    for _, total in layout] if any(packed) else [])
        where = {index: (number, offset, nbytes) for number, (segments, _) in enumerate(layout)
                 for index, offset, nbytes in segments}
        for (name, _, _), (module, attr, shard, shape) in zip(manifest, targets, strict=True):
            param = getattr(module, attr)
            fused = rows.get((id(module), attr))
            full_rows = sum(fused.values()) if fused else (shape[0] if shape else 1)
            full_shape = (full_rows, *shape[1:]) if shape else ()
            offset = sum(fused[i] for i in range(shard)) if fused else 0
            if fused and sorted(fused) != list(range(len(fused))):
                return None, f"{name!r}: shards {sorted(fused)} of a fused tensor are missing"
            if packed[len(views)]:
                # vLLM packed this layer's weight for its CPU kernel and dropped the original:
                # keep a full copy here and re-pack from it after each change.
                if module not in unpacked:
                    # Its shards, if they are the next entries in shard order (q, k, v).
                    parts = range(len(views), len(views) + len(fused or [0]))
                    in_order = all(k < len(targets) and targets[k][0] is module
                                   and targets[k][2] in (None, k - parts[0]) for k in parts)
                    view = _in_bucket(buckets, where, parts, full_shape, param.dtype)
                    unpacked[module] = view if in_order and view is not None else torch.empty(
                        full_shape, dtype=param.dtype, device=param.device)
                storage = unpacked[module]
                users = [module]
            else:
                if tuple(param.shape[1:]) != tuple(full_shape[1:]) or (
                        param.shape[:1] != full_shape[:1] and not _is_vocab(module)):
                    return None, (f"{name!r} has shape {tuple(param.shape)} in the engine, "
                                  f"{full_shape} from the learner")
                storage = param.data
                users = by_storage.get(param.data_ptr(), []) if param.numel() else []
            count = shape[0] if shape else 1
            view = storage[offset:offset + count] if shape else storage
            if tuple(view.shape) != tuple(shape):
                return None, f"{name!r} does not fit its engine tensor"
            views.append(view)
            repack.append(users)
        return cls(views, repack, unpacked, buckets), ""

    def load_full(self, received: Iterable[tuple[int, torch.Tensor]]) -> int:
        """Copy every received tensor into place; returns how many layers were re-packed."""
        return self._load((index, _copy_from(tensor)) for index, tensor in received)

    def load_delta(self, received: Iterable[tuple[int, int, int, torch.Tensor]]) -> int:
        """Apply each changed tensor's delta in place; returns how many layers were re-packed."""
        return self._load((index, lambda view, e=encoding, c=count, p=payload:
                           apply_delta(view, e, c, p))
                          for index, encoding, count, payload in received)

    def _load(self, writes: Iterable[tuple[int, Callable[[torch.Tensor], object]]]) -> int:
        """Run each write on its view, re-packing a changed layer as soon as the stream has passed
        its last tensor (tensors arrive in manifest order): the packing then overlaps the next
        bucket's transfer instead of following the whole sync."""
        dirty: dict[int, torch.nn.Module] = {}
        repacked = 0
        for index, write in writes:
            repacked += self._repack(dirty, before=index)
            write(self.views[index])
            dirty.update((id(layer), layer) for layer in self.repack[index])
        return repacked + self._repack(dirty, before=None)

    def _repack(self, dirty: dict[int, torch.nn.Module], before: int | None) -> int:
        done = [key for key in dirty if before is None or self.last[key] < before]
        for key in done:
            layer = dirty.pop(key)
            if layer in self.unpacked:
                # process_weights_after_loading packs from `weight` and then drops it again.
                layer.weight = torch.nn.Parameter(self.unpacked[layer], requires_grad=False)
            layer.quant_method.process_weights_after_loading(layer)
        return len(done)

    def digests(self, manifest: WeightManifest) -> list[str]:
        """A hash of each tensor as the engine holds it, to compare engines and syncs bitwise."""
        return digests(self.views, manifest)


def _packed_users(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """Layers holding a packed copy of a weight they still keep (vLLM's CPU vocabulary layers),
    by the weight's storage: after that weight changes in place, their packed copies must be
    rebuilt. When an lm_head is tied to the embedding, only the lm_head's copy is: it computes
    the logits, while the embedding's copy is never used (its forward is a lookup in the weight
    itself); rebuilding it too would double the cost of the largest matrix."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    users: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (hasattr(module, "cpu_linear") and hasattr(module, "quant_method")
                and isinstance(weight, torch.Tensor) and weight.numel() > 0):
            users.setdefault(weight.data_ptr(), []).append(module)
    for key, modules in users.items():
        heads = [m for m in modules if isinstance(m, ParallelLMHead)]
        users[key] = heads or modules
    return users


def _copy_from(tensor: torch.Tensor) -> Callable[[torch.Tensor], object]:
    def write(view: torch.Tensor) -> None:
        if view.data_ptr() != tensor.data_ptr():  # else the wire wrote it in place already
            view.copy_(tensor)
    return write


def _in_bucket(buckets: list[torch.Tensor], where: dict[int, tuple[int, int, int]],
               indices: range, shape: tuple[int, ...], dtype: torch.dtype
               ) -> torch.Tensor | None:
    """A view of `shape` over the entries `indices` of one bucket, if they lie back to back."""
    spots = [where[i] for i in indices]
    number, start, _ = spots[0]
    end = start
    for n, offset, nbytes in spots:
        if n != number or offset != end:
            return None
        end = offset + nbytes
    if not buckets or (end - start) != math.prod(shape) * dtype.itemsize:
        return None
    return buckets[number][start:end].view(dtype).view(shape)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_vocab(module: torch.nn.Module) -> bool:
    """Vocabulary layers may be padded beyond the checkpoint's rows (the view takes the first)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return isinstance(module, VocabParallelEmbedding)
