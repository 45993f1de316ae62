"""Sequence packing for the learner: micro-batches by token budget, no padding in the model.

A GRPO batch holds G completions of every prompt. A micro-batch is one row of packed tokens:

    [prompt a][response a1][response a2]...[prompt b][response b1]...

Each prompt is packed once and shared by its responses (their position ids restart at the
prompt's end, so every response sees exactly the sequence `prompt + response` it was sampled
as), and nothing else is shared: no token attends across sequences. Every linear layer, which
is where the work is, runs on real tokens only.

Attention is the only part that needs to know the layout. `packed_attention` (registered with
transformers as the "rlsys_packed" attention implementation) gathers each sequence's queries
and keys into a small padded block, runs scaled-dot-product attention there with a mask, and
scatters the outputs back to the packed row. The padding lives only in these blocks (response
rows are as wide as the longest prompt plus the longest response of the micro-batch); the same
function runs on CPU and GPU (SDPA picks the kernel). On CPU attention is about a quarter of a
SmolLM2 micro-batch, mostly SDPA's backward, whose cost was measured not to shrink with the
padded area (blocks bucketed by width ran no faster). A variable-length kernel (flash-attn's
varlen) is the GPU upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "rlsys_packed"


@dataclass
class RowSet:
    """Same-kind rows (all prompts, or all responses) of a packed micro-batch, padded into a block.

    Row r's queries are the packed positions `q_index[r, :q_len]`; its keys are the context
    positions (the prompt, for a response) followed by its own positions, `kv_index[r]`.
    `mask[r, 0, i, j]` says whether query i may attend to key j: all of the context, and its own
    positions causally. Padding queries attend to key 0 so that no row of the mask is empty
    (an empty row makes softmax NaN); their outputs are dropped.
    """

    q_index: torch.Tensor  # [R, Q] long
    q_valid: torch.Tensor  # [R, Q] bool
    kv_index: torch.Tensor  # [R, K] long
    mask: torch.Tensor  # [R, 1, Q, K] bool

    def to(self, device: torch.device) -> RowSet:
        return RowSet(*(t.to(device) for t in (self.q_index, self.q_valid, self.kv_index,
                                                self.mask)))


@dataclass
class PackedLayout:
    """Everything `packed_attention` needs: the row sets and how to put outputs back in order."""

    rowsets: list[RowSet]
    inverse: torch.Tensor  # [T] position of packed token t among the concatenated row outputs

    def to(self, device: torch.device) -> PackedLayout:
        return PackedLayout([r.to(device) for r in self.rowsets], self.inverse.to(device))


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

    A unit is one prompt with as many of its responses as fit the budget (a group that does not
    fit is split, and its prompt repeated); units are then placed first-fit-decreasing, which
    fills micro-batches to within one unit of the budget.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        if not p or not response_ids[i]:
            raise ValueError(f"completion {i}: prompt and response must each have a token")
        by_prompt.setdefault(tuple(p), []).append(i)
    units: list[tuple[tuple[int, ...], list[int], int]] = []
    for prompt, members in by_prompt.items():
        piece: list[int] = []
        size = len(prompt)
        for i in members:
            width = len(response_ids[i])
            if len(prompt) + width > max_tokens:
                raise ValueError(f"a sequence of {len(prompt) + width} tokens exceeds "
                                 f"learner.max_tokens_per_microbatch={max_tokens}")
            if piece and size + width > max_tokens:
                units.append((prompt, piece, size))
                piece, size = [], len(prompt)
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
            bins.append((unit[2], [unit]))
    return [_collate([(p, m) for p, m, _ in members], response_ids) for _, members in bins]


def _rowset(rows: list[tuple[list[int], list[int]]]) -> tuple[RowSet, list[int]]:
    """Build a RowSet from (context positions, own positions) per row."""
    width_q = max(len(own) for _, own in rows)
    width_k = max(len(ctx) + len(own) for ctx, own in rows)
    q_index = torch.zeros((len(rows), width_q), dtype=torch.long)
    q_valid = torch.zeros((len(rows), width_q), dtype=torch.bool)
    kv_index = torch.zeros((len(rows), width_k), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width_q, width_k), dtype=torch.bool)
    mask[:, 0, :, 0] = True  # overwritten below for real queries
    positions: list[int] = []
    for r, (ctx, own) in enumerate(rows):
        c, q = len(ctx), len(own)
        q_index[r, :q] = torch.tensor(own)
        q_valid[r, :q] = True
        kv_index[r, : c + q] = torch.tensor(ctx + own)
        mask[r, 0, :q, :] = False
        mask[r, 0, :q, :c] = True
        mask[r, 0, :q, c: c + q] = torch.ones(q, q, dtype=torch.bool).tril()
        positions += own
    return RowSet(q_index, q_valid, kv_index, mask), positions


def _collate(units: list[tuple[tuple[int, ...], list[int]]],
             response_ids: list[list[int]]) -> PackedMicroBatch:
    tokens: list[int] = []
    position_ids: list[int] = []
    prompt_rows: list[tuple[list[int], list[int]]] = []
    response_rows: list[tuple[list[int], list[int]]] = []
    predict: list[int] = []
    targets: list[int] = []
    index: list[int] = []
    for prompt, members in units:
        start = len(tokens)
        prompt_span = list(range(start, start + len(prompt)))
        tokens += prompt
        position_ids += range(len(prompt))
        prompt_rows.append(([], prompt_span))
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
    prompts, order_p = _rowset(prompt_rows)
    responses, order_r = _rowset(response_rows)
    inverse = torch.empty(len(tokens), dtype=torch.long)
    inverse[torch.tensor(order_p + order_r)] = torch.arange(len(tokens))
    return PackedMicroBatch(
        input_ids=torch.tensor(tokens), position_ids=torch.tensor(position_ids),
        layout=PackedLayout([prompts, responses], inverse),
        predict_index=torch.tensor(predict), targets=torch.tensor(targets),
        response_lens=[len(response_ids[i]) for i in index], index=index)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0,
                     packed_layout: PackedLayout | None = None, **kwargs: object
                     ) -> tuple[torch.Tensor, None]:
    """Attention over a packed row (transformers' attention-function interface).

    query [1, H, T, d], key/value [1, H_kv, T, d] (grouped-query heads are expanded by SDPA);
    returns [1, T, H, d] like transformers' own implementations.
    """
    if packed_layout is None:
        raise ValueError("the rlsys_packed attention needs packed_layout= in the forward call")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError("packed attention does not implement attention dropout")
    q, k, v = query[0], key[0], value[0]
    outputs = []
    for rows in packed_layout.rowsets:
        block_q = q[:, rows.q_index].transpose(0, 1)  # [R, H, Q, d]
        block_k = k[:, rows.kv_index].transpose(0, 1)
        block_v = v[:, rows.kv_index].transpose(0, 1)
        out = F.scaled_dot_product_attention(block_q, block_k, block_v, attn_mask=rows.mask,
                                             scale=scaling, enable_gqa=True)
        outputs.append(out.transpose(1, 2)[rows.q_valid])  # [n_valid, H, d]
    return torch.cat(outputs)[packed_layout.inverse][None], None


def _no_mask(*args: object, **kwargs: object) -> None:
    """The packed layout is the mask: transformers must not build a dense [T, T] one."""
    return None


def register_packed_attention() -> None:
    """Make "rlsys_packed" an attention implementation transformers models can use."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
