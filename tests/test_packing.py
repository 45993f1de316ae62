"""Sequence packing (learners/packing.py) against the plain padded batch.

The same GRPO batch is run two ways on the tiny random model in float32:

* packed: `pack_microbatches` + the "rlsys_packed" attention, each prompt once, no padding,
  the loss accumulated micro-batch by micro-batch with the whole batch's normalisers (as
  `Learner.train_step` does);
* padded: every prompt + response its own right-padded row, one standard forward of a
  separately loaded model with its default (SDPA) attention and an attention mask, log-softmax
  gathered at the response positions, one loss over the whole batch.

Per-token log-probs, the GRPO loss and its gradients must agree, with the prompts distinct and
with a prefix they all share (packed once per micro-batch); packing must add no token and let
no token see another sequence.
"""

from __future__ import annotations

import pytest
import torch

from learners.packing import (
    ATTENTION_NAME,
    PackedMicroBatch,
    pack_microbatches,
    register_packed_attention,
    width_blocks,
)
from rlsys.algo import grpo_loss
from rlsys.models import resolve_model

ATOL = 1e-5
PAD = 0
MAX_RESPONSE_LEN = 48
BUDGET = 96  # tokens per packed micro-batch: several micro-batches, one group split


def _batch() -> tuple[list[list[int]], list[list[int]]]:
    """4 prompts x G=4 completions of very different lengths (1 .. 48 tokens), random ids."""
    gen = torch.Generator().manual_seed(0)
    prompt_lens = [3, 9, 17, 30]
    response_lens = [[1, 48, 5, 20], [33, 2, 11, 40], [7, 1, 26, 3], [45, 12, 1, 30]]
    prompts, responses = [], []
    for p_len, lens in zip(prompt_lens, response_lens, strict=True):
        prompt = torch.randint(2, 512, (p_len,), generator=gen).tolist()
        for r_len in lens:
            prompts.append(prompt)
            responses.append(torch.randint(2, 512, (r_len,), generator=gen).tolist())
    return prompts, responses


PROMPTS, RESPONSES = _batch()
# The same prompts behind a common 12-token prefix, as few-shot examples or a system prompt are.
PREFIX = torch.randint(2, 512, (12,), generator=torch.Generator().manual_seed(3)).tolist()
SHARED_PROMPTS = [PREFIX + p for p in PROMPTS]
# name -> (prompts, micro-batch budget): the same micro-batches of responses either way.
BATCHES = {"distinct": (PROMPTS, BUDGET), "shared_prefix": (SHARED_PROMPTS, BUDGET + len(PREFIX))}
ADVANTAGES = torch.linspace(-1.5, 1.5, len(RESPONSES))[torch.randperm(
    len(RESPONSES), generator=torch.Generator().manual_seed(1))]
# Old log-probs a little off the current ones, so that some ratios are clipped.
OLD_SHIFT = 0.3 * torch.randn(len(RESPONSES), MAX_RESPONSE_LEN,
                              generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny_path(cache_dir) -> str:
    return str(resolve_model("tiny-random", cache_dir))


@pytest.fixture(scope="module")
def packed_model(tiny_path):
    from transformers import AutoModelForCausalLM

    register_packed_attention()
    return AutoModelForCausalLM.from_pretrained(
        tiny_path, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()


@pytest.fixture(scope="module")
def plain_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_path, dtype=torch.float32, attn_implementation="sdpa").eval()


def packed_logprobs(model, mb: PackedMicroBatch) -> torch.Tensor:
    """Log-probs [N] of the micro-batch's response tokens, as `Learner._logprobs` computes them."""
    out = model(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None],
                packed_layout=mb.layout, logits_to_keep=mb.predict_index, use_cache=False)
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    return logp.gather(-1, mb.targets[:, None]).squeeze(-1)


def padded_logprobs(model, prompts: list[list[int]], responses: list[list[int]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [n, max response len] and the response mask, from one right-padded batch."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits.float(), dim=-1)
    # Token t of a sequence is predicted by the logits at position t - 1.
    rows = [logp[i, len(p) - 1: len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None])[:, 0]
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
    lens = [len(r) for r in responses]
    return _pad_rows(torch.cat(rows), lens), _lens_mask(lens)


def _pad_rows(flat: torch.Tensor, lens: list[int]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(lens)), batch_first=True)


def _lens_mask(lens: list[int]) -> torch.Tensor:
    return torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]


def _loss(logprobs: torch.Tensor, mask: torch.Tensor, idx: list[int], mode: str,
          num_tokens: float, num_seqs: float) -> torch.Tensor:
    width = logprobs.shape[1]
    old = torch.where(mask, logprobs.detach() + OLD_SHIFT[idx, :width], 0.0)
    loss, _ = grpo_loss(logprobs, old, ADVANTAGES[idx], mask, loss_agg=mode,
                        num_tokens=num_tokens, num_seqs=num_seqs, norm_len=MAX_RESPONSE_LEN)
    return loss


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def test_the_batch_packs_into_several_microbatches_and_splits_a_group():
    mbs = pack_microbatches(PROMPTS, RESPONSES, BUDGET)
    assert len(mbs) >= 3
    groups_per_prompt = {}
    for mb in mbs:
        for prompt in {tuple(PROMPTS[i]) for i in mb.index}:
            groups_per_prompt[prompt] = groups_per_prompt.get(prompt, 0) + 1
    assert max(groups_per_prompt.values()) > 1  # some group's prompt is repeated


@pytest.mark.parametrize("batch", BATCHES)
def test_packed_logprobs_equal_the_padded_batch(packed_model, plain_model, batch):
    prompts, budget = BATCHES[batch]
    with torch.no_grad():
        want, mask = padded_logprobs(plain_model, prompts, RESPONSES)
        seen = set()
        for mb in pack_microbatches(prompts, RESPONSES, budget):
            got = packed_logprobs(packed_model, mb)
            for i, lp in zip(mb.index, got.split(mb.response_lens), strict=True):
                torch.testing.assert_close(lp, want[i, :len(RESPONSES[i])], atol=ATOL, rtol=0)
                seen.add(i)
    assert seen == set(range(len(RESPONSES)))
    assert int(mask.sum()) == sum(len(r) for r in RESPONSES)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_packed_loss_and_gradients_equal_the_padded_batch(packed_model, plain_model, mode,
                                                          batch):
    prompts, budget = BATCHES[batch]
    n = len(RESPONSES)
    num_tokens, num_seqs = float(sum(len(r) for r in RESPONSES)), float(n)

    # Padded: one forward, one loss over the whole batch.
    plain_model.zero_grad(set_to_none=True)
    logprobs, mask = padded_logprobs(plain_model, prompts, RESPONSES)
    want = _loss(logprobs, mask, list(range(n)), mode, num_tokens, num_seqs)
    want.backward()
    want_grads = _grads(plain_model)

    # Packed: per micro-batch losses with the global normalisers, gradients accumulated.
    packed_model.zero_grad(set_to_none=True)
    got = torch.zeros(())
    for mb in pack_microbatches(prompts, RESPONSES, budget):
        lp = _pad_rows(packed_logprobs(packed_model, mb), mb.response_lens)
        loss = _loss(lp, _lens_mask(mb.response_lens), mb.index, mode, num_tokens, num_seqs)
        loss.backward()
        got = got + loss.detach()
    got_grads = _grads(packed_model)

    torch.testing.assert_close(got, want.detach(), atol=ATOL, rtol=0)
    assert want_grads.keys() == got_grads.keys()
    assert len(want_grads) == len(list(plain_model.parameters()))
    for name, g in want_grads.items():
        scale = float(g.abs().max())
        assert scale > 0, name
        # Gradients range from 1e-4 to 0.3 here: atol relative to each tensor's largest entry.
        torch.testing.assert_close(got_grads[name], g, atol=ATOL * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("batch", BATCHES)
def test_packing_adds_no_padding_and_respects_the_budget(batch):
    prompts, _ = BATCHES[batch]
    shared = len(PREFIX) if batch == "shared_prefix" else 0
    distinct_all = {tuple(p) for p in prompts}
    whole = shared + sum(len(p) - shared for p in distinct_all) + sum(map(len, RESPONSES))
    for budget in (BUDGET + shared, 80 + shared, 160, 1000):
        mbs = pack_microbatches(prompts, RESPONSES, budget)
        assert sorted(i for mb in mbs for i in mb.index) == list(range(len(RESPONSES)))
        total = 0
        for mb in mbs:
            assert mb.num_tokens <= budget
            # The shared prefix once, then each distinct prompt's own tokens once.
            distinct = {tuple(prompts[i]) for i in mb.index}
            prompt_tokens = shared + sum(len(p) - shared for p in distinct)
            assert mb.num_tokens == prompt_tokens + sum(len(RESPONSES[i]) for i in mb.index)
            assert mb.input_ids[:shared].tolist() == PREFIX[:shared]
            assert len(mb.position_ids) == len(mb.targets) + prompt_tokens
            assert mb.response_lens == [len(RESPONSES[i]) for i in mb.index]
            total += mb.num_tokens
        if budget >= whole:
            assert len(mbs) == 1  # everything fits: one micro-batch, each prompt once
        assert total >= whole


def test_no_token_attends_across_sequences(packed_model):
    """Changing one sequence's tokens changes no other sequence's log-probs in the same row."""
    prompts = [[5, 6, 7, 8]] * 3 + [[40, 41, 42]] * 2
    responses = [[10, 11, 12], [13, 14, 15, 16, 17], [18], [19, 20, 21, 22], [23, 24]]

    def logprobs(prompts, responses) -> list[torch.Tensor]:
        # All five sequences share one packed row.
        (mb,) = pack_microbatches(prompts, responses, max_tokens=1000)
        with torch.no_grad():
            lp = packed_logprobs(packed_model, mb).split(mb.response_lens)
        out: list[torch.Tensor] = [torch.empty(0)] * len(responses)
        for i, x in zip(mb.index, lp, strict=True):
            out[i] = x
        return out

    base = logprobs(prompts, responses)
    # A response changed (same length): only that response's log-probs may move.
    changed = [list(r) for r in responses]
    changed[1] = [100, 101, 102, 103, 104]
    after = logprobs(prompts, changed)
    for i in range(len(responses)):
        if i == 1:
            assert not torch.allclose(after[i], base[i])
        else:
            torch.testing.assert_close(after[i], base[i], atol=1e-6, rtol=0)
    # The second prompt changed: its two responses move, the first prompt's three do not.
    changed_prompts = [list(p) for p in prompts]
    changed_prompts[3] = changed_prompts[4] = [200, 201, 202]
    after = logprobs(changed_prompts, responses)
    for i in range(3):
        torch.testing.assert_close(after[i], base[i], atol=1e-6, rtol=0)
    for i in (3, 4):
        assert not torch.allclose(after[i], base[i])


def test_packed_row_layout():
    """Positions restart after the prompt; the attention blocks see only their own sequence."""
    prompts = [[1, 2, 3]] * 2 + [[4, 5, 6, 7, 8]] * 3
    responses = [[10, 11], [12, 13, 14, 15], [16], [17, 18, 19], [20, 21]]
    (mb,) = pack_microbatches(prompts, responses, max_tokens=1000)
    tokens, positions = mb.input_ids.tolist(), mb.position_ids.tolist()
    assert mb.num_tokens == 3 + 5 + 2 + 4 + 1 + 3 + 2

    # Spans of the packed row, rebuilt from the token order: prompt, its responses, next prompt.
    spans: dict[int, tuple[list[int], list[int]]] = {}
    cursor = 0
    seen_prompts: dict[tuple[int, ...], list[int]] = {}
    for i in mb.index:
        p = tuple(prompts[i])
        if p not in seen_prompts:
            seen_prompts[p] = list(range(cursor, cursor + len(p)))
            assert tokens[cursor: cursor + len(p)] == prompts[i]
            assert positions[cursor: cursor + len(p)] == list(range(len(p)))
            cursor += len(p)
        own = list(range(cursor, cursor + len(responses[i])))
        assert tokens[cursor: cursor + len(own)] == responses[i]
        assert positions[cursor: cursor + len(own)] == list(range(len(p), len(p) + len(own)))
        spans[i] = (seen_prompts[p], own)
        cursor += len(own)
    assert cursor == mb.num_tokens

    prompt_rows, response_rows = mb.layout.rowsets
    expected_rows = ([([], span) for span in seen_prompts.values()],
                     [spans[i] for i in mb.index])
    for rows, expected in zip((prompt_rows, response_rows), expected_rows, strict=True):
        assert rows.q_index.shape[0] == len(expected)
        width_q, width_k = rows.q_index.shape[1], rows.kv_index.shape[1]
        assert rows.mask.shape == (len(expected), 1, width_q, width_k)
        for r, (ctx, own) in enumerate(expected):
            c, q = len(ctx), len(own)
            assert rows.q_index[r, :q].tolist() == own
            assert rows.q_valid[r].tolist() == [True] * q + [False] * (width_q - q)
            assert rows.kv_index[r, :c + q].tolist() == ctx + own
            mask = rows.mask[r, 0]
            # Real queries: the whole context, their own positions causally, nothing else.
            want = torch.zeros((q, width_k), dtype=torch.bool)
            want[:, :c] = True
            want[:, c:c + q] = torch.ones((q, q), dtype=torch.bool).tril()
            assert torch.equal(mask[:q], want)
            # Padding queries attend to key 0 only (no empty softmax row); their output is dropped.
            pad = torch.zeros((width_q - q, width_k), dtype=torch.bool)
            pad[:, 0] = True
            assert torch.equal(mask[q:], pad)

    # Outputs go back in packed order: the rows' valid queries, permuted by `inverse`, are 0..T-1.
    order = torch.cat([rows.q_index[rows.q_valid] for rows in mb.layout.rowsets])
    assert torch.equal(order[mb.layout.inverse], torch.arange(mb.num_tokens))

    # Response token k is predicted from its own sequence's previous token.
    for i, predict, targets in zip(mb.index, mb.predict_index.split(mb.response_lens),
                                   mb.targets.split(mb.response_lens), strict=True):
        ctx, own = spans[i]
        assert predict.tolist() == [ctx[-1], *own[:-1]]
        assert targets.tolist() == responses[i]


def test_a_shared_prefix_is_packed_once_and_isolates_the_prompts(packed_model):
    """Prompts behind a common prefix: the prefix once at positions 0.., each prompt's own
    tokens after it at positions that continue it, and changing one prompt's own tokens moves
    only its responses."""
    prefix = [30, 31, 32, 33]
    prompts = [[*prefix, 5, 6]] * 2 + [[*prefix, 7]] * 2 + [[*prefix, 8, 9, 10]]
    responses = [[11, 12], [13], [14, 15, 16], [17], [18, 19]]
    (mb,) = pack_microbatches(prompts, responses, max_tokens=1000)
    assert mb.num_tokens == 4 + 2 + 1 + 3 + sum(map(len, responses))
    assert mb.input_ids[:4].tolist() == prefix
    assert mb.position_ids[:4].tolist() == [0, 1, 2, 3]
    order = [tuple(prompts[i]) for i in mb.index]
    own = {p: list(p[4:]) for p in order}
    tokens, positions = mb.input_ids.tolist(), mb.position_ids.tolist()
    cursor, seen = 4, set()
    for i, p in zip(mb.index, order, strict=True):
        if p not in seen:
            seen.add(p)
            assert tokens[cursor: cursor + len(own[p])] == own[p]
            assert positions[cursor: cursor + len(own[p])] == list(range(4, len(p)))
            cursor += len(own[p])
        assert tokens[cursor: cursor + len(responses[i])] == responses[i]
        assert positions[cursor: cursor + len(responses[i])] == list(
            range(len(p), len(p) + len(responses[i])))
        cursor += len(responses[i])

    def logprobs(prompts) -> dict[int, torch.Tensor]:
        (mb,) = pack_microbatches(prompts, responses, max_tokens=1000)
        with torch.no_grad():
            lp = packed_logprobs(packed_model, mb).split(mb.response_lens)
        return dict(zip(mb.index, lp, strict=True))

    base = logprobs(prompts)
    changed = [list(p) for p in prompts]
    changed[2] = changed[3] = [*prefix, 99]
    after = logprobs(changed)
    for i in range(len(responses)):
        if i in (2, 3):
            assert not torch.allclose(after[i], base[i])
        else:
            torch.testing.assert_close(after[i], base[i], atol=1e-6, rtol=0)
    # One distinct prompt, or prompts that differ from their first token: nothing is shared.
    (one,) = pack_microbatches(prompts[:2], responses[:2], max_tokens=1000)
    assert one.num_tokens == len(prompts[0]) + 3
    assert len(one.layout.rowsets) == 2


def test_width_blocks_give_a_long_row_a_block_of_its_own():
    """One truncated response among short ones would pad every row of its block to its width."""
    rows = [([0], list(range(n))) for n in (24, 26, 96, 21, 25, 36)]
    blocks = width_blocks(rows)
    assert [[len(own) for _, own in block] for block in blocks] == [[24, 26, 21, 25, 36], [96]]
    assert [[len(own) for _, own in block] for block in width_blocks(rows, slack=0)] == [
        [24, 26, 21, 25], [36], [96]]
    assert width_blocks([]) == []
    (mb,) = pack_microbatches([[1, 2, 3]] * len(rows), [own for _, own in rows], 1000)
    widths = [rows.q_index.shape[1] for rows in mb.layout.rowsets]
    assert widths == [3, 36, 96]  # the prompt's block, then the responses' two
