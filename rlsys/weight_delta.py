"""Delta encoding of one tensor's changes, for `learner.sync_mode=delta` (rlsys/weight_sync.py).

A tensor's new values travel as the smallest of: nothing (unchanged), all values, int32 indices
of the changed values then the values, or a bitmask of the changed positions then the values.
Changes are found bit for bit (`as_bits`), so applying them reproduces the sender's tensor
exactly, -0.0 and NaN included. Payloads are byte buffers whose parts start on `ALIGN_BYTES`
boundaries, so each part can be viewed as its own dtype.

A leaf: torch only, and the same code on CPU and CUDA tensors.
"""

from __future__ import annotations

import torch

# Offsets of tensors inside a packed bucket are rounded up to this many bytes so that every slice
# can be reinterpreted (`.view(dtype)`) as its own dtype, whatever the element size.
ALIGN_BYTES = 64


def padded(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGN_BYTES."""
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def typed(payload: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    """The first `count` elements of `dtype` in the byte tensor `payload`."""
    return payload[:count * dtype.itemsize].view(dtype)



SKIP, FULL, INDEX, MASK = 0, 1, 2, 3  # how one tensor's changes travel


def delta_nbytes(encoding: int, changed: int, numel: int, itemsize: int) -> int:
    """Bytes of a tensor's payload: nothing (skip); all values (full); int32 indices then the
    changed values (index); a bitmask of ceil(numel/8) bytes then the changed values (mask)."""
    if encoding == SKIP:
        return 0
    if encoding == FULL:
        return numel * itemsize
    head = changed * 4 if encoding == INDEX else -(-numel // 8)
    return padded(head) + changed * itemsize


def choose_encoding(changed: int, numel: int, itemsize: int) -> int:
    """The smallest payload for `changed` of `numel` values (ties go to the simpler encoding)."""
    if changed == 0:
        return SKIP
    return min((FULL, INDEX, MASK),
               key=lambda e: (delta_nbytes(e, changed, numel, itemsize), e))


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
# x * _GATHER_BITS >> 56 moves the low bit of each of x's 8 bytes to bits 0..7 of the result
# (byte j's to bit j; the other partial products never reach bits 56..63): eight flags packed by
# one integer multiply, on any device.
_GATHER_BITS = 0x0102040810204080


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor → uint8 bitmask, bit j of byte i = mask[8i + j] (any device)."""
    n = mask.numel()
    if n % 8:
        mask = torch.cat([mask, mask.new_zeros(8 - n % 8)])
    lanes = mask.view(torch.uint8).view(torch.int64)  # 8 flags (0 or 1 bytes) per int64
    return ((lanes * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` flags as a bool tensor."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return ((bits[:, None] & weights) != 0).view(-1)[:numel]


def apply_delta(target: torch.Tensor, encoding: int, changed: int, payload: torch.Tensor) -> None:
    """Write one tensor's encoded changes (`payload`, bytes) into `target` in place.

    Values are copied bit for bit: the result equals the sender's tensor exactly.
    """
    flat = target.view(-1)
    if encoding == FULL:
        flat.copy_(typed(payload, flat.dtype, flat.numel()))
        return
    head = padded(delta_nbytes(encoding, changed, flat.numel(), flat.element_size())
                  - changed * flat.element_size())
    values = typed(payload[head:], flat.dtype, changed)
    if encoding == INDEX:
        flat[typed(payload, torch.int32, changed).long()] = values
    elif encoding == MASK:
        # masked_scatter_ takes the values in order; indexing with a bool mask would first
        # turn it into indices (measured 10x slower on CPU).
        flat.masked_scatter_(unpack_bits(payload[:-(-flat.numel() // 8)], flat.numel()), values)
    elif encoding != SKIP:
        raise ValueError(f"unknown delta encoding {encoding}")


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers: changes are compared bit for bit (-0.0 != 0.0, NaN == NaN)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.view(ints[tensor.element_size()])
