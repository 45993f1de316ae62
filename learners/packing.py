"""Sequence packing for the learner: micro-batches by token budget, no padding in the model.

A GRPO batch holds G completions of every prompt. A micro-batch is one row of packed tokens:

    [prompt a][response a1][response a2]...[prompt b][response b1]...

Each prompt is packed once and shared by its responses (their position ids restart at the
prompt's end, so every response sees exactly the sequence `prompt + response` it was sampled
as). The prompts' common prefix (few-shot examples, a system prompt, a chat template's header)
is packed once per micro-batch too, and each prompt's own tokens follow it as their context:

    [shared prefix][rest of prompt a][response a1]...[rest of prompt b][response b1]...

Both are exact, since a causal model's states for a prefix do not depend on what follows it
(their gradients add up over everything that attends to them); nothing else is shared, and no
token attends across sequences. Every linear layer, which is where the work is, runs on real
tokens only, and each shared token runs once: the demo's 64 completions of 8 few-shot prompts
(164 prompt tokens each, ~25 response tokens) pack into ~1,900 tokens instead of ~2,900.

Attention is the only part that needs to know the layout. `packed_attention` (registered with
transformers as the "rlsys_packed" attention implementation) sees every sequence as one row:
its queries are its own positions, its keys its context (the prompt, for a response) followed
by its own positions, causally. The layout describes the rows once, and one function serves
them with one of two kinds of kernel, chosen by `attention_backend` from the device:

* "sdpa" (CPU, and any GPU without a variable-length kernel): the rows are gathered into small
  padded blocks, scaled-dot-product attention runs there with a block mask, and the outputs are
  scattered back. The padding lives only in these blocks, one per kind of row and width
  (`width_blocks`: a row is as wide as the longest of its block). On CPU attention is about a
  quarter of a SmolLM2 micro-batch, mostly SDPA's backward. Its cost barely moves with widths
  spread evenly, but one long row among short ones used to pad them all: a single truncated
  response in the demo's batch made the update 1.65x slower, 1.12x once it had its own block.
* "flash_attn" / "torch_varlen" (CUDA, half precision): the rows go to a variable-length kernel
  as they are, concatenated, with cumulative lengths (flash-attn's `flash_attn_varlen_func` if
  the package is installed, else PyTorch's `torch.nn.attention.varlen.varlen_attn`). Its causal
  mask is aligned to the bottom-right corner of each row (query i of a row with q queries and k
  keys sees keys j <= k - q + i), which is exactly "all of the context, its own positions
  causally". No padding, no [rows, queries, keys] mask: at 32k-token responses a block mask
  would be a GB per response.

Both put their outputs back in packed order with the same permutation (`PackedLayout.inverse`);
`packed_attention_parity` compares them on a GPU.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "rlsys_packed"
BACKENDS = ("sdpa", "flash_attn", "torch_varlen")


@dataclass
class RowSet:
    """Same-kind rows (all prompts, or all responses) of a packed micro-batch, padded into a block.

    Row r's queries are the packed positions `q_index[r, :q_len]`; its keys are the context
    positions (the prompt, for a response; `ctx_len[r]` of them) followed by its own positions,
    `kv_index[r]`. `mask[r, 0, i, j]` says whether query i may attend to key j: all of the
    context, and its own positions causally. Padding queries attend to key 0 so that no row of
    the mask is empty (an empty row makes softmax NaN); their outputs are dropped. The mask is
    built on first use, on the rows' device: only the SDPA path needs it.
    """

    q_index: torch.Tensor  # [R, Q] long
    q_valid: torch.Tensor  # [R, Q] bool
    kv_index: torch.Tensor  # [R, K] long
    ctx_len: torch.Tensor  # [R] long

    @functools.cached_property
    def mask(self) -> torch.Tensor:  # [R, 1, Q, K] bool
        width_q = self.q_index.shape[1]
        width_k = self.kv_index.shape[1]
        dev = self.q_index.device
        i = torch.arange(width_q, device=dev)[None, :, None]
        j = torch.arange(width_k, device=dev)[None, None, :]
        c = self.ctx_len[:, None, None]
        # Query i of a row sees the context (j < c) and its own positions up to itself
        # (c <= j <= c + i); a padding query sees key 0.
        allowed = (j < c) | (j - c <= i)
        return torch.where(self.q_valid[:, :, None], allowed, j == 0)[:, None]

    def to(self, device: torch.device) -> RowSet:
        return RowSet(*(t.to(device) for t in (self.q_index, self.q_valid, self.kv_index,
                                                self.ctx_len)))


@dataclass
class VarlenRows:
    """All rows (prompts, then responses) as one variable-length batch, for varlen kernels.

    Row r's queries are the packed positions `q_index[cu_q[r]:cu_q[r+1]]` (its own positions),
    its keys `kv_index[cu_k[r]:cu_k[r+1]]` (its context, then its own positions); the kernel's
    bottom-right aligned causal mask then lets each query see the whole context and its own
    earlier positions. `q_index` is the same order as the SDPA path's concatenated outputs.
    """

    q_index: torch.Tensor  # [T] long
    kv_index: torch.Tensor  # [sum of row key lengths] long
    cu_q: torch.Tensor  # [R + 1] int32
    cu_k: torch.Tensor  # [R + 1] int32
    max_q: int
    max_k: int

    def to(self, device: torch.device) -> VarlenRows:
        return VarlenRows(self.q_index.to(device), self.kv_index.to(device),
                          self.cu_q.to(device), self.cu_k.to(device), self.max_q, self.max_k)


@dataclass
class PackedLayout:
    """Everything `packed_attention` needs: the rows, for either kind of kernel, and how to put
    outputs back in order."""

    rowsets: list[RowSet]
    inverse: torch.Tensor  # [T] position of packed token t among the concatenated row outputs
    varlen: VarlenRows

    def to(self, device: torch.device) -> PackedLayout:
        return PackedLayout([r.to(device) for r in self.rowsets], self.inverse.to(device),
                            self.varlen.to(device))


@dataclass
class PackedMicroBatch:
    """One packed row and where its response tokens are."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    layout: PackedLayout
    # Response token k (all responses, row-major) is predicted by the hidden state at packed
    # position predict_index[k]: the prompt's last token for a response's first token.
    predict_index: torch.Tensor  # [N]
    targets: torch.Tensor  # [N]
    response_lens: list[int]
    index: list[int]  # the responses' positions in the batch, in packing order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack_microbatches(prompt_ids: list[list[int]], response_ids: list[list[int]],
                      max_tokens: int) -> list[PackedMicroBatch]:
    """Pack a batch into micro-batches of at most `max_tokens` tokens each.

    A unit is one prompt (less the batch's shared prefix) with as many of its responses as fit
    the budget (a group that does not fit is split, and its prompt repeated); units are then
    placed first-fit-decreasing, which fills micro-batches to within one unit of the budget.
    Every micro-batch starts with the shared prefix, the longest one all the batch's distinct
    prompts begin with (a batch whose prompts share nothing, or of one prompt, has none).
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        if not p or not response_ids[i]:
            raise ValueError(f"completion {i}: prompt and response must each have a token")
        by_prompt.setdefault(tuple(p), []).append(i)
    shared = shared_prefix_len(list(by_prompt))
    units: list[tuple[tuple[int, ...], list[int], int]] = []
    for prompt, members in by_prompt.items():
        piece: list[int] = []
        own = size = len(prompt) - shared
        for i in members:
            width = len(response_ids[i])
            if len(prompt) + width > max_tokens:
                raise ValueError(f"a sequence of {len(prompt) + width} tokens exceeds "
                                 f"learner.max_tokens_per_microbatch={max_tokens}")
            if piece and shared + size + width > max_tokens:
                units.append((prompt, piece, size))
                piece, size = [], own
            piece.append(i)
            size += width
        units.append((prompt, piece, size))
    units.sort(key=lambda u: -u[2])
    bins: list[tuple[int, list[tuple[tuple[int, ...], list[int], int]]]] = []
    for unit in units:
        for b, (used, members) in enumerate(bins):
            if used + unit[2] <= max_tokens:
                bins[b] = (used + unit[2], [*members, unit])
                break
        else:
            bins.append((shared + unit[2], [unit]))
    return [_collate([(p, m) for p, m, _ in members], response_ids, shared)
            for _, members in bins]


def shared_prefix_len(prompts: list[tuple[int, ...]]) -> int:
    """Tokens all `prompts` begin with, leaving each at least one of its own; 0 for < 2 prompts.

    A response's first token is predicted from its prompt's last token, which must be that
    prompt's own: the prefix stops one token short of the shortest prompt.
    """
    if len(prompts) < 2:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def width_blocks(rows: list[tuple[list[int], list[int]]], growth: float = 1.5,
                 slack: int = 16) -> list[list[tuple[list[int], list[int]]]]:
    """Rows (context positions, own positions) split into blocks of similar width, narrowest
    first: a block takes the rows whose own length is at most `growth` times its narrowest
    row's, or `slack` tokens more, whichever is wider; rows keep their order within a block.

    SDPA pads every row of a block to the block's longest, so one long row in a block of
    short ones multiplies its attention: in a demo-shaped batch (64 responses of 20-28 tokens
    behind a 140-token few-shot prefix) one response cut off at 96 tokens made the update
    11.7 s instead of 7.1 (2 cores), and 8.0 s in a block of its own. A block more costs one
    more small SDPA call per layer.
    """
    starts: list[int] = []  # the narrowest width of each block
    for width in sorted(len(own) for _, own in rows):
        if not starts or width > max(int(starts[-1] * growth), starts[-1] + slack):
            starts.append(width)
    blocks: list[list[tuple[list[int], list[int]]]] = [[] for _ in starts]
    for row in rows:  # in packing order within a block
        blocks[bisect.bisect_right(starts, len(row[1])) - 1].append(row)
    return blocks


def _rowset(rows: list[tuple[list[int], list[int]]]) -> tuple[RowSet, list[int]]:
    """Build a RowSet from (context positions, own positions) per row."""
    width_q = max(len(own) for _, own in rows)
    width_k = max(len(ctx) + len(own) for ctx, own in rows)
    q_index = torch.zeros((len(rows), width_q), dtype=torch.long)
    q_valid = torch.zeros((len(rows), width_q), dtype=torch.bool)
    kv_index = torch.zeros((len(rows), width_k), dtype=torch.long)
    positions: list[int] = []
    for r, (ctx, own) in enumerate(rows):
        c, q = len(ctx), len(own)
        q_index[r, :q] = torch.tensor(own)
        q_valid[r, :q] = True
        kv_index[r, : c + q] = torch.tensor(ctx + own)
        positions += own
    ctx_len = torch.tensor([len(ctx) for ctx, _ in rows], dtype=torch.long)
    return RowSet(q_index, q_valid, kv_index, ctx_len), positions


def _varlen_rows(rows: list[tuple[list[int], list[int]]]) -> VarlenRows:
    """The same rows, in the same order, as one variable-length batch."""
    q_lens = [len(own) for _, own in rows]
    k_lens = [len(ctx) + len(own) for ctx, own in rows]

    def cumulative(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    return VarlenRows(
        q_index=torch.tensor([p for _, own in rows for p in own], dtype=torch.long),
        kv_index=torch.tensor([p for ctx, own in rows for p in (*ctx, *own)], dtype=torch.long),
        cu_q=cumulative(q_lens), cu_k=cumulative(k_lens), max_q=max(q_lens), max_k=max(k_lens))


def _collate(units: list[tuple[tuple[int, ...], list[int]]], response_ids: list[list[int]],
             shared: int) -> PackedMicroBatch:
    tokens: list[int] = list(units[0][0][:shared])
    position_ids: list[int] = list(range(shared))
    prefix_span = list(range(shared))
    prefix_rows: list[tuple[list[int], list[int]]] = [([], prefix_span)] if shared else []
    prompt_rows: list[tuple[list[int], list[int]]] = []
    response_rows: list[tuple[list[int], list[int]]] = []
    predict: list[int] = []
    targets: list[int] = []
    index: list[int] = []
    for prompt, members in units:
        start = len(tokens)
        own_span = list(range(start, start + len(prompt) - shared))
        tokens += prompt[shared:]
        position_ids += range(shared, len(prompt))
        prompt_rows.append((prefix_span, own_span))
        prompt_span = prefix_span + own_span
        for i in members:
            response = response_ids[i]
            start = len(tokens)
            span = list(range(start, start + len(response)))
            tokens += response
            position_ids += range(len(prompt), len(prompt) + len(response))
            response_rows.append((prompt_span, span))
            predict += [prompt_span[-1], *span[:-1]]
            targets += response
            index.append(i)
    # Blocks by kind of row (the prefix is long, prompts' own parts and responses short), and
    # within a kind by width (see `width_blocks`).
    rowsets, order, ordered_rows = [], [], []
    for rows in (prefix_rows, prompt_rows, response_rows):
        for block in width_blocks(rows):
            rowset, positions = _rowset(block)
            rowsets.append(rowset)
            order += positions
            ordered_rows += block
    inverse = torch.empty(len(tokens), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(tokens))
    return PackedMicroBatch(
        input_ids=torch.tensor(tokens), position_ids=torch.tensor(position_ids),
        layout=PackedLayout(rowsets, inverse,
                            _varlen_rows(ordered_rows)),
        predict_index=torch.tensor(predict), targets=torch.tensor(targets),
        response_lens=[len(response_ids[i]) for i in index], index=index)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0,
                     packed_layout: PackedLayout | None = None, **kwargs: object
                     ) -> tuple[torch.Tensor, None]:
    """Attention over a packed row (transformers' attention-function interface).

    query [1, H, T, d], key/value [1, H_kv, T, d] (grouped-query heads are expanded by the
    kernel); returns [1, T, H, d] like transformers' own implementations.
    """
    if packed_layout is None:
        raise ValueError("the rlsys_packed attention needs packed_layout= in the forward call")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("packed attention does not implement attention dropout")
    backend = attention_backend(query.device, query.dtype, query.shape[-1])
    return attend(query[0], key[0], value[0], packed_layout, scaling, backend)[None], None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
           scaling: float | None, backend: str) -> torch.Tensor:
    """Packed attention with the given kernel: q [H, T, d], k/v [H_kv, T, d] -> [T, H, d].

    Every backend gathers the same rows from the same layout and returns their outputs in the
    same (row) order, which `layout.inverse` puts back in packed order.
    """
    if backend == "sdpa":
        outputs = []
        for rows in layout.rowsets:
            block_q = q[:, rows.q_index].transpose(0, 1)  # [R, H, Q, d]
            block_k = k[:, rows.kv_index].transpose(0, 1)
            block_v = v[:, rows.kv_index].transpose(0, 1)
            out = F.scaled_dot_product_attention(block_q, block_k, block_v,
                                                 attn_mask=rows.mask, scale=scaling,
                                                 enable_gqa=True)
            outputs.append(out.transpose(1, 2)[rows.q_valid])  # [n_valid, H, d]
        return torch.cat(outputs)[layout.inverse]
    kernel = _varlen_kernel(backend)
    if kernel is None:
        raise ValueError(f"packed attention backend {backend!r} is not available here")
    rows = layout.varlen
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [T, H, d]
    out = kernel(q[rows.q_index], k[rows.kv_index], v[rows.kv_index], rows, scaling)
    return out[layout.inverse]


def attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The packed-attention kernel for tensors of this device, dtype and head size.

    CUDA in half precision with a head size the flash kernels serve: flash-attn's varlen kernel
    if the package imports, else PyTorch's; everything else (CPU, float32, a PyTorch without
    `torch.nn.attention.varlen`): SDPA over padded blocks.
    """
    if (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16)
            or head_dim % 8 or head_dim > 256):
        return "sdpa"
    for backend in ("flash_attn", "torch_varlen"):
        if _varlen_kernel(backend) is not None:
            return backend
    return "sdpa"


VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VarlenRows, float | None],
                        torch.Tensor]


@functools.cache
def _varlen_kernel(backend: str) -> VarlenKernel | None:
    """(q [Tq, H, d], k/v [Tk, H_kv, d], rows, scale) -> [Tq, H, d], or None if not installed."""
    if backend == "flash_attn":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:  # not installed (the optional `flash-attn` extra), or broken
            return None

        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: VarlenRows,
                  scale: float | None) -> torch.Tensor:
            # Grouped-query heads are native; causal is bottom-right aligned (flash-attn >= 2.1).
            return flash_attn_varlen_func(q, k, v, rows.cu_q, rows.cu_k, rows.max_q, rows.max_k,
                                          dropout_p=0.0, softmax_scale=scale, causal=True)

        return flash
    if backend == "torch_varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # PyTorch < 2.10
            return None
        params = inspect.signature(varlen_attn).parameters

        def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: VarlenRows,
                         scale: float | None) -> torch.Tensor:
            # The signature moved between releases: causal is `window_size=(-1, 0)` since 2.12
            # (`is_causal=True` before), and `scale` / `enable_gqa` are not in every release.
            kw: dict[str, object] = ({"window_size": (-1, 0)} if "window_size" in params
                                     else {"is_causal": True})
            if "scale" in params:
                kw["scale"] = scale
            elif scale is not None:  # the kernel's own scale is 1/sqrt(d): fold ours into q
                q = q * (scale * math.sqrt(q.shape[-1]))
            if k.shape[1] != q.shape[1]:
                if "enable_gqa" in params:
                    kw["enable_gqa"] = True
                else:
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return varlen_attn(q, k, v, rows.cu_q, rows.cu_k, rows.max_q, rows.max_k, **kw)

        return torch_varlen
    if backend == "sdpa":
        return None
    raise ValueError(f"unknown packed attention backend {backend!r}: one of {BACKENDS}")


def packed_attention_parity(device: str | torch.device = "cuda",
                            dtype: torch.dtype = torch.bfloat16, *, backend: str | None = None,
                            num_heads: int = 16, num_kv_heads: int = 4, head_dim: int = 128,
                            prompt_lens: tuple[int, ...] = (700, 150, 1900),
                            response_lens: tuple[int, ...] = (2048, 5, 900, 3000, 1, 1200, 60),
                            seed: int = 0) -> dict[str, object]:
    """The chosen kernel (by default `attention_backend`'s pick) against SDPA on one packed row.

    Random queries/keys/values for a micro-batch of the given prompts and responses (response
    i belongs to prompt i % len(prompt_lens)); forward and backward through both kernels in
    `dtype`, and through SDPA in float32 as the reference. Returns the backend, the token count,
    the largest output and input-gradient differences of each kernel from the float32 reference
    and from each other, the milliseconds of one forward + backward of each, and "ok": the
    kernel is within twice SDPA's own error of the reference (plus a small floor for tiny
    values). Used by `benchmarks/gpu_check.py`; on CPU the backend is SDPA and the check is
    trivial.
    """
    device = torch.device(device)
    backend = backend or attention_backend(device, dtype, head_dim)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in prompt_lens]
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(response_lens))]
    responses = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in response_lens]
    total = sum(prompt_lens) + sum(response_lens)
    (mb,) = pack_microbatches(batch_prompts, responses, total)
    layout = mb.layout.to(device)
    t = mb.num_tokens
    q = torch.randn(num_heads, t, head_dim, generator=gen)
    k = torch.randn(num_kv_heads, t, head_dim, generator=gen)
    v = torch.randn(num_kv_heads, t, head_dim, generator=gen)
    grad_out = torch.randn(t, num_heads, head_dim, generator=gen)
    scale = 1.0 / math.sqrt(head_dim)

    def run(kind: str, run_dtype: torch.dtype) -> tuple[list[torch.Tensor], float]:
        inputs = [x.to(device, run_dtype, copy=True).requires_grad_() for x in (q, k, v)]
        for _ in range(2):  # the second run is timed (the first compiles/loads kernels)
            for x in inputs:
                x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = attend(*inputs, layout, scale, kind)
            out.backward(grad_out.to(device, run_dtype))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms = 1000 * (time.perf_counter() - start)
        return [out.detach().float(), *(x.grad.float() for x in inputs)], ms

    reference, _ = run("sdpa", torch.float32)
    sdpa, sdpa_ms = run("sdpa", dtype)
    kernel, kernel_ms = run(backend, dtype)
    names = ("out", "grad_q", "grad_k", "grad_v")

    def diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
        return {n: float((x - y).abs().max()) for n, x, y in zip(names, a, b, strict=True)}

    kernel_err, sdpa_err = diffs(kernel, reference), diffs(sdpa, reference)
    floor = {n: 1e-3 * float(r.abs().max()) for n, r in zip(names, reference, strict=True)}
    return {
        "backend": backend, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "tokens": t, "kernel_vs_fp32": kernel_err, "sdpa_vs_fp32": sdpa_err,
        "kernel_vs_sdpa": diffs(kernel, sdpa), "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms,
        "ok": all(kernel_err[n] <= 2 * sdpa_err[n] + floor[n] for n in names),
    }


def _no_mask(*args: object, **kwargs: object) -> None:
    """The packed layout is the mask: transformers must not build a dense [T, T] one."""
    return None


def register_packed_attention() -> None:
    """Make "rlsys_packed" an attention implementation transformers models can use."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
