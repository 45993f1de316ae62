"""The packed-attention kernels (learners/packing.py): which one runs where, and that the
variable-length path serves the same rows as the SDPA path.

No variable-length kernel runs on CPU (flash-attn and `torch.nn.attention.varlen` are CUDA
only), so the varlen path is exercised here with a reference kernel of the same contract,
written below from flash-attn's documented semantics (bottom-right aligned causal mask): the
index gathering, the cumulative lengths, the grouped-query heads, the scale and the reordering
are all the production code's. The real kernels are compared with SDPA on a GPU by
`packing.packed_attention_parity` (benchmarks/gpu_check.py). That the SDPA path equals plain,
unpacked attention is tests/test_packing.py's subject.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.attention.varlen
import torch.nn.functional as F

from learners import packing
from learners.packing import attend, attention_backend, pack_microbatches

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, gqa=True):
    """Variable-length causal attention, row by row: query i of a row with n_q queries and n_k
    keys sees keys j <= n_k - n_q + i (flash-attn's causal mask for n_q != n_k)."""
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert cu_q.dtype == cu_k.dtype == torch.int32
    if not gqa:
        assert k.shape[1] == q.shape[1]
    out = []
    for r in range(len(cu_q) - 1):
        qr = q[cu_q[r]:cu_q[r + 1]].transpose(0, 1)  # [H, n_q, d]
        kr = k[cu_k[r]:cu_k[r + 1]].transpose(0, 1)
        vr = v[cu_k[r]:cu_k[r + 1]].transpose(0, 1)
        n_q, n_k = qr.shape[1], kr.shape[1]
        mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
        out.append(F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale,
                                                  enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                     block_table=None, num_splits=None):
    """`torch.nn.attention.varlen.varlen_attn`'s signature in torch 2.13, on CPU."""
    assert window_size == (-1, 0)  # causal
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale,
                            gqa=enable_gqa)


def varlen_attn_older(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                      return_aux=None):
    """An older signature: causal by flag, no scale, no grouped-query heads."""
    assert is_causal
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=False)


@pytest.fixture
def fake_torch_varlen(monkeypatch):
    """`fake_torch_varlen(fn)`: make the "torch_varlen" backend call `fn` (on CPU)."""
    def use(fn):
        monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", fn)
        packing._varlen_kernel.cache_clear()

    yield use
    packing._varlen_kernel.cache_clear()


def _batch():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 99, (n,), generator=gen).tolist() for n in (7, 1, 13)]
    lens = (9, 1, 4, 40, 2, 5, 11)  # 40: a response block of its own (width_blocks)
    responses = [torch.randint(1, 99, (n,), generator=gen).tolist() for n in lens]
    (mb,) = pack_microbatches([prompts[i % 3] for i in range(len(lens))], responses, 1000)
    return mb


def test_the_backend_follows_device_dtype_and_what_is_installed(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert attention_backend(CPU, dtype, 64) == "sdpa"
    assert attention_backend(CUDA, torch.float32, 64) == "sdpa"  # varlen kernels: half only

    installed: set[str] = set()
    monkeypatch.setattr(packing, "_varlen_kernel",
                        lambda name: (lambda *a: None) if name in installed else None)
    assert attention_backend(CUDA, torch.bfloat16, 64) == "sdpa"  # old torch, no flash-attn
    installed.add("torch_varlen")
    assert attention_backend(CUDA, torch.bfloat16, 64) == "torch_varlen"
    installed.add("flash_attn")
    assert attention_backend(CUDA, torch.bfloat16, 128) == "flash_attn"
    assert attention_backend(CUDA, torch.float16, 128) == "flash_attn"
    assert attention_backend(CUDA, torch.bfloat16, 257) == "sdpa"  # beyond the flash kernels
    assert attention_backend(CPU, torch.bfloat16, 64) == "sdpa"


def test_packed_attention_runs_sdpa_on_cpu(monkeypatch):
    mb = _batch()
    seen = []
    real = packing.attend
    monkeypatch.setattr(packing, "attend",
                        lambda *args: seen.append(args[-1]) or real(*args))
    t = mb.num_tokens
    q, k, v = torch.randn(1, 4, t, 32), torch.randn(1, 2, t, 32), torch.randn(1, 2, t, 32)
    for dtype in (torch.float32, torch.bfloat16):
        out, _ = packing.packed_attention(None, q.to(dtype), k.to(dtype), v.to(dtype), None,
                                          scaling=0.2, packed_layout=mb.layout)
        assert out.shape == (1, t, 4, 32) and out.dtype == dtype
    assert seen == ["sdpa", "sdpa"]


@pytest.mark.parametrize("signature", ["torch-2.13", "older"])
def test_the_varlen_path_equals_the_sdpa_path(fake_torch_varlen, signature):
    """Same outputs and input gradients (fp32, GQA, a non-default scale) through both paths."""
    fake_torch_varlen(varlen_attn_2_13 if signature == "torch-2.13" else varlen_attn_older)
    mb = _batch()
    t, heads, kv_heads, d = mb.num_tokens, 4, 2, 32
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(h, t, d, generator=gen) for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(t, heads, d, generator=gen)
    results = {}
    for backend in ("sdpa", "torch_varlen"):
        x = [i.clone().requires_grad_() for i in inputs]
        out = attend(*x, mb.layout, 0.7 / math.sqrt(d), backend)
        out.backward(grad_out)
        results[backend] = [out.detach(), *(i.grad for i in x)]
    for name, want, got in zip(("out", "grad_q", "grad_k", "grad_v"), results["sdpa"],
                               results["torch_varlen"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_varlen_rows_describe_the_same_rows_as_the_blocks():
    mb = _batch()
    rows = mb.layout.varlen
    blocks = mb.layout.rowsets
    assert torch.equal(rows.q_index, torch.cat([b.q_index[b.q_valid] for b in blocks]))
    q_lens = torch.cat([b.q_valid.sum(1) for b in blocks])
    k_lens = torch.cat([b.ctx_len for b in blocks]) + q_lens
    assert rows.cu_q.tolist() == [0, *q_lens.cumsum(0).tolist()]
    assert rows.cu_k.tolist() == [0, *k_lens.cumsum(0).tolist()]
    assert (rows.max_q, rows.max_k) == (int(q_lens.max()), int(k_lens.max()))
    kv = [b.kv_index[r, :n] for b in blocks
          for r, n in enumerate((b.ctx_len + b.q_valid.sum(1)).tolist())]
    assert torch.equal(rows.kv_index, torch.cat(kv))
    moved = mb.layout.to(CPU)
    assert (moved.varlen.max_q, moved.varlen.max_k) == (rows.max_q, rows.max_k)


def test_packed_attention_parity_runs_on_cpu(fake_torch_varlen):
    small = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "prompt_lens": (9, 3),
             "response_lens": (12, 1, 30, 7)}
    report = packing.packed_attention_parity("cpu", torch.bfloat16, **small)
    assert report["backend"] == "sdpa" and report["ok"]
    assert report["tokens"] == 9 + 3 + 12 + 1 + 30 + 7
    assert all(v == 0 for v in report["kernel_vs_sdpa"].values())
    # The varlen path in bf16 is as close to the fp32 reference as SDPA in bf16.
    fake_torch_varlen(varlen_attn_2_13)
    report = packing.packed_attention_parity("cpu", torch.bfloat16, backend="torch_varlen",
                                             **small)
    assert report["backend"] == "torch_varlen" and report["ok"], report
    assert report["sdpa_vs_fp32"]["out"] > 0  # bf16 rounding: the check is not vacuous
