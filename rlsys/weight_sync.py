"""Learner → rollout-engine weight broadcast over a standalone torch process group.

The learner (rank 0) and every rollout engine (ranks 1..N) form a process group of their own,
built from a `TCPStore` and a gloo/NCCL backend constructed directly. It is never registered as
a default group, so it neither disturbs nor depends on the default groups that vLLM (inside each
engine) and the learner group (inside each learner) create for themselves.

Weights travel in buckets: a bucket is a run of consecutive tensors packed into one flat byte
buffer, so a model of many small tensors costs few collective calls while no buffer ever holds
more than one bucket. Both sides derive the same buckets from the same `WeightManifest` and
`bucket_bytes`, so nothing but the raw bytes crosses the wire.

A leaf (imports only torch, neither Ray nor vLLM) shared by both ends of the wire: the same code
runs in a learner actor, in a vLLM worker extension, and in a plain test process; only `backend`
("gloo" or "nccl") and the receiving device differ between CPU and GPU.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
from torch.distributed import ProcessGroup, TCPStore

# (parameter name, shape, wire dtype name such as "bfloat16"): plain data, so it pickles through
# Ray and vLLM's collective_rpc, which cannot carry tensors.
WeightManifest = list[tuple[str, tuple[int, ...], str]]

# Offsets of tensors inside a packed bucket are rounded up to this many bytes so that every slice
# can be reinterpreted (`.view(dtype)`) as its own dtype, whatever the element size.
_ALIGN_BYTES = 64

# Measured on the 2-core CPU box, a SmolLM2-135M-shaped state dict (273 tensors, 269 MB in bf16,
# cast from fp32 masters), gloo, two processes, median of 6 after a warm-up:
#   per tensor 0.33-0.35 s | 4 MB 0.23-0.24 s | 16 MB 0.24 s | 64 MB 0.33 s | 256 MB 0.33-0.35 s.
# End to end into a vLLM engine in a Ray actor (receive + reload + re-pack): per tensor 1.3-1.5 s,
# 16 MB 0.65-0.68 s, 64 MB 0.59-0.64 s (the reload's re-packing dominates).
# Big buckets lose on CPU to the pack copy and page-faulting fresh buffers; 16 MB is as fast as
# the best and keeps NCCL calls few on GPUs (a 7B model in bf16 is ~900 calls).
DEFAULT_BUCKET_BYTES = 16 * 1024 * 1024


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_weight_sync_group(
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    timeout_s: float = 300,
) -> ProcessGroup:
    """Join (rank 0: host) a standalone process group for weight broadcasts.

    All `world_size` ranks must call this concurrently: the backend's constructor blocks until
    every rank has connected. Rank 0 (the learner) runs the `TCPStore` server.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    # wait_for_workers=False: the backend constructor below already waits for the full mesh, and
    # waiting here too would only duplicate the timeout handling.
    store = TCPStore(master_addr, master_port, world_size, rank == 0, timeout,
                     wait_for_workers=False)
    group = ProcessGroup(store, rank, world_size)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        impl = ProcessGroupGloo(store, rank, world_size, timeout)
        backend_type, device = ProcessGroup.BackendType.GLOO, torch.device("cpu")
    else:
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        impl = ProcessGroupNCCL(store, rank, world_size, options)
        backend_type, device = ProcessGroup.BackendType.NCCL, torch.device("cuda")
    # Registering the backend on a bare ProcessGroup gives the usual ProcessGroup API (broadcast,
    # barrier, rank, size) without entering torch.distributed's global group registry.
    group._set_default_backend(backend_type)
    impl._set_sequence_number_for_group()
    group._register_backend(device, backend_type, impl)
    return group


def close_weight_sync_group(group: ProcessGroup | None) -> None:
    """Release a group from `init_weight_sync_group`, so its members can form a new one.

    Its world size is fixed, so adding or removing an engine means every member drops the old
    group and joins a new one. Dropping the reference is enough for gloo (its sockets close with
    the object), but NOT for NCCL: since torch 2.4 the communicator's destructor only warns and
    leaks it (GPU memory, proxy threads) unless the group was shut down, and the group is not
    registered with torch.distributed, so `destroy_process_group` cannot do it for us.
    `ProcessGroup.shutdown()` is what `destroy_process_group` calls; it releases an NCCL
    communicator gracefully and is a no-op for gloo, so one call serves both backends. It
    waits for the group's outstanding work: call it on every member at about the same time
    (some NCCL versions treat the teardown as collective), between broadcasts.
    """
    if group is not None:
        group.shutdown()


def dtype_from_name(name: str) -> torch.dtype:
    """`"bfloat16"` → `torch.bfloat16`; rejects names that are not torch dtypes."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_manifest(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> WeightManifest:
    """Describe tensors for the receivers; `dtype` (if given) is the wire dtype for floats.

    Non-floating tensors (e.g. integer buffers) keep their dtype: casting them would corrupt them.
    """
    manifest: WeightManifest = []
    for name, tensor in named_tensors:
        wire = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        manifest.append((name, tuple(tensor.shape), dtype_name(wire)))
    return manifest


def _padded_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    nbytes = math.prod(shape) * dtype.itemsize
    return -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES


def plan_buckets(manifest: WeightManifest, bucket_bytes: int) -> list[list[int]]:
    """Group manifest indices, in order, into buckets of at most `bucket_bytes` bytes.

    `bucket_bytes <= 0` means one tensor per bucket. A tensor larger than a bucket gets a bucket
    of its own. Sender and receivers call this with the same inputs and get the same plan.
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, (_, shape, dtype) in enumerate(manifest):
        nbytes = _padded_nbytes(shape, dtype_from_name(dtype))
        if current and (bucket_bytes <= 0 or current_bytes + nbytes > bucket_bytes):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


def _bucket_layout(manifest: WeightManifest, bucket: list[int]) -> tuple[list[int], int]:
    """Byte offsets of the bucket's tensors inside its packed buffer, and the buffer size."""
    offsets, total = [], 0
    for index in bucket:
        _, shape, dtype = manifest[index]
        offsets.append(total)
        total += _padded_nbytes(shape, dtype_from_name(dtype))
    return offsets, total


def _unpack(buffer: torch.Tensor, manifest: WeightManifest, bucket: list[int],
            offsets: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    for index, offset in zip(bucket, offsets, strict=True):
        name, shape, dtype_str = manifest[index]
        dtype = dtype_from_name(dtype_str)
        flat = buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype)
        yield name, flat.view(shape)


def _wire_device(group: ProcessGroup) -> torch.device:
    """Where tensors must live to be sent: NCCL moves CUDA memory only, gloo host memory.

    Staging on this device lets a learner hand over whatever it has (CUDA parameters, or a
    CPU-offloaded full state dict) with either backend.
    """
    if group.name() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_weights(
    group: ProcessGroup,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    manifest: WeightManifest,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    src: int = 0,
) -> dict[str, float]:
    """Send `named_tensors` (in manifest order) to every other rank of `group`.

    Each tensor is cast to its manifest dtype and staged on the backend's device (CUDA for NCCL,
    host for gloo) on the way; `dtype`, if given, must agree with the manifest's floating-point
    entries (it lets a caller assert the wire dtype it expects). `named_tensors` may be
    a lazy iterator (e.g. gathering one sharded parameter at a time): it is consumed bucket by
    bucket, so at most one bucket of extra memory is held.

    Returns {"bytes", "seconds", "buckets"} for logging.
    """
    if dtype is not None:
        mismatched = [name for name, _, wire in manifest
                      if wire != dtype_name(dtype) and dtype_from_name(wire).is_floating_point]
        if mismatched:
            raise ValueError(f"manifest wire dtype differs from {dtype} for {mismatched[:3]}")
    buckets = plan_buckets(manifest, bucket_bytes)
    tensors = iter(named_tensors)
    device = _wire_device(group)
    sent_bytes = 0
    start = time.perf_counter()
    for bucket in buckets:
        sources: list[torch.Tensor] = []
        for index in bucket:
            name, shape, _ = manifest[index]
            try:
                got_name, tensor = next(tensors)
            except StopIteration:
                raise ValueError(f"named_tensors ended before manifest entry {name!r}") from None
            if got_name != name or tuple(tensor.shape) != shape:
                raise ValueError(f"expected {name} {shape}, got {got_name} {tuple(tensor.shape)}")
            sources.append(tensor.detach())
        if len(sources) == 1:
            # A lone tensor goes as it is when it already has the wire dtype and device.
            wire = dtype_from_name(manifest[bucket[0]][2])
            payload = sources[0].to(device=device, dtype=wire).contiguous()
        else:
            offsets, total = _bucket_layout(manifest, bucket)
            payload = torch.empty(total, dtype=torch.uint8, device=device)
            # copy_ casts and moves in one pass, straight into the packed buffer.
            for (_, view), tensor in zip(_unpack(payload, manifest, bucket, offsets), sources,
                                         strict=True):
                view.copy_(tensor)
        # One bucket at a time: keeping a second bucket in flight while packing the next was
        # measured no faster on 2 cores (gloo's thread competes with the packing), and on GPUs
        # NCCL's wait() only orders streams, so the host already runs ahead.
        group.broadcast(payload, src).wait()
        sent_bytes += payload.numel() * payload.element_size()
    if next(tensors, None) is not None:
        raise ValueError("named_tensors has more entries than the manifest")
    if device.type == "cuda":
        # NCCL's wait() returns before the transfer ends; sync so "seconds" is the real cost.
        torch.cuda.current_stream(device).synchronize()
    return {"bytes": float(sent_bytes), "seconds": time.perf_counter() - start,
            "buckets": float(len(buckets))}


def receive_weights(
    group: ProcessGroup,
    manifest: WeightManifest,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str = "cpu",
    src: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive what `broadcast_weights` sends, yielding (name, tensor) as each bucket lands.

    Tensors of one bucket are views into that bucket's buffer; each bucket gets a fresh buffer,
    so a consumer may keep references (vLLM's layerwise reload buffers a layer's weights until
    the layer is complete). The iterator must be consumed to the end, or the ranks fall out of
    step.
    """
    for bucket in plan_buckets(manifest, bucket_bytes):
        if len(bucket) == 1:
            name, shape, wire = manifest[bucket[0]]
            tensor = torch.empty(shape, dtype=dtype_from_name(wire), device=device)
            group.broadcast(tensor, src).wait()
            yield name, tensor
            continue
        offsets, total = _bucket_layout(manifest, bucket)
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
        group.broadcast(buffer, src).wait()
        yield from _unpack(buffer, manifest, bucket, offsets)
