"""Learner → rollout-engine weight broadcast over a standalone torch process group.

The learner (rank 0) and every rollout engine (ranks 1..N) form a process group of their own,
built from a `TCPStore` and a gloo/NCCL backend constructed directly. It is never registered as
a default group, so it neither disturbs nor depends on the default groups that vLLM (inside each
engine) and the learner group (inside each learner) create for themselves.

Weights travel in buckets: a bucket is a run of consecutive tensors packed into one flat byte
buffer, so a model of many small tensors costs few collective calls. Both sides derive the same
buckets from the same `WeightManifest` and `bucket_bytes`, so nothing but the raw bytes crosses
the wire. Buffers are reused from one sync to the next, and each side works on one bucket while
the next is on the wire.

Two kinds of sync (`learner.sync_mode`): full sends every value; delta, once the receivers hold
the last send, sends per tensor only the wire-dtype values whose bits changed, encoded as the
smallest of int32 indices + values, a bitmask + values, or all values (nothing when unchanged),
after a small header from which the receivers derive the layout. With bf16 on the wire most
fp32 updates round to the same bf16 value, so a step changes a few percent of them.

A leaf (imports only torch, neither Ray nor vLLM) shared by both ends of the wire: the same code
runs in a learner actor, in a vLLM worker extension, and in a plain test process; only `backend`
("gloo" or "nccl") and the receiving device differ between CPU and GPU.
"""

from __future__ import annotations

import hashlib
import math
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed import ProcessGroup, TCPStore

from rlsys.metrics import PhaseTimer
from rlsys.weight_delta import (
    ALIGN_BYTES,
    FULL,
    INDEX,
    MASK,
    as_bits,
    choose_encoding,
    delta_nbytes,
    pack_bits,
    padded,
    typed,
)

# (parameter name, shape, wire dtype name such as "bfloat16"): plain data, so it pickles through
# Ray and vLLM's collective_rpc, which cannot carry tensors.
WeightManifest = list[tuple[str, tuple[int, ...], str]]


# Measured on the 2-core CPU box, a SmolLM2-135M-shaped state dict (273 tensors, 269 MB in bf16,
# cast from fp32 masters), gloo, two processes, median of 6 after a warm-up:
#   per tensor 0.33-0.35 s | 4 MB 0.23-0.24 s | 16 MB 0.24 s | 64 MB 0.33 s | 256 MB 0.33-0.35 s.
# End to end into a vLLM engine in a Ray actor (receive + reload + re-pack): per tensor 1.3-1.5 s,
# 16 MB 0.65-0.68 s, 64 MB 0.59-0.64 s (the reload's re-packing dominates).
# Big buckets lose on CPU to the pack copy and page-faulting fresh buffers; 16 MB is as fast as
# the best and keeps NCCL calls few on GPUs (a 7B model in bf16 is ~900 calls).
DEFAULT_BUCKET_BYTES = 16 * 1024 * 1024


#: Lowest port `find_free_port` draws: Ray's own worker ports are 10002-19999 by default.
_PORT_FLOOR = 20000


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`, for a rendezvous server that binds it later.

    Drawn from below the kernel's ephemeral port range when there is room for it: `bind(host, 0)`
    hands out ports from that range, and so does every outgoing connection on the machine, so
    between choosing such a port and binding it one of Ray's many connections can take it
    (EADDRINUSE, seen in CI). Ports below the range are only ever taken by explicit binds.
    Where the server can bind port 0 itself and report it, prefer that
    (`host_weight_sync_store`): no gap at all.
    """
    low = _ephemeral_port_floor()
    if low - _PORT_FLOOR >= 1000:
        rng = random.Random()
        for _ in range(100):
            port = rng.randrange(_PORT_FLOOR, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_port_floor() -> int:
    """The lowest port the kernel hands out for bind(0) and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def host_weight_sync_store(host: str, timeout_s: float = 300) -> TCPStore:
    """Rank 0's rendezvous server for `init_weight_sync_group`, listening on a port the OS picks
    as it binds (`store.port`, which the other ranks are then told): no port is chosen first and
    bound later, so none can be taken in between. Keep it for as long as the group lives (NCCL
    reads the store when a communicator is first used)."""
    return TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


#: Seconds gloo may take to connect its mesh once every rank has checked in (a fraction of a
#: second normally). A rank that dies in between would otherwise hold the others there for the
#: whole timeout: after this they fail, and the fleet forms the group again without it.
MESH_TIMEOUT_S = 30.0

#: Store key of a forming group whose join was called off (`abort_weight_sync_join`).
_ABORT_KEY = "rlsys/join-aborted"


class WeightSyncJoinAborted(RuntimeError):
    """The group being joined will not form: a member died before joining it, and whoever
    noticed (the fleet) called the join off so the others do not wait out the timeout."""


def abort_weight_sync_join(master_addr: str, master_port: int, reason: str) -> bool:
    """Call off the join of the group whose rendezvous runs at `master_addr:master_port`: every
    rank waiting in `init_weight_sync_group` raises `WeightSyncJoinAborted(reason)` within a
    poll interval. Returns False when the rendezvous server cannot be reached (its host is
    gone, and with it the waiting ranks' connections, so they fail on their own)."""
    try:
        client = TCPStore(master_addr, master_port, None, False, timedelta(seconds=10),
                          wait_for_workers=False)
        client.set(_ABORT_KEY, reason)
    except RuntimeError:  # torch's DistStoreError and DistNetworkError derive from it
        return False
    return True


def _roll_call(store: TCPStore, rank: int, world_size: int, timeout_s: float) -> None:
    """Wait until every rank has checked in, before the backend connects its mesh.

    The backend's constructor cannot be interrupted: a rank that died before joining would
    keep the others in it for the whole timeout (300 s by default). Checking in through the
    store first lets a join be called off at once (`abort_weight_sync_join`), and a timeout
    names the ranks that never came.
    """
    present = [f"rlsys/present/{r}" for r in range(world_size)]
    store.set(present[rank], "1")
    deadline = time.monotonic() + timeout_s
    while not store.check(present):
        if store.check([_ABORT_KEY]):
            raise WeightSyncJoinAborted(store.get(_ABORT_KEY).decode())
        if time.monotonic() > deadline:
            missing = [r for r, key in enumerate(present) if not store.check([key])]
            raise TimeoutError(f"weight-sync group of {world_size}: rank(s) {missing} did not "
                               f"join within {timeout_s:.0f} s")
        time.sleep(0.05)


def init_weight_sync_group(
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    timeout_s: float = 300,
    store: TCPStore | None = None,
) -> ProcessGroup:
    """Join (rank 0: host) a standalone process group for weight broadcasts.

    All `world_size` ranks must call this concurrently: it returns once every rank has joined,
    raises `WeightSyncJoinAborted` when the join is called off (`abort_weight_sync_join`),
    `TimeoutError` naming the missing ranks after `timeout_s`, and gloo's error when a rank
    that checked in never connects (`MESH_TIMEOUT_S`). Broadcasts time out after `timeout_s`.
    Rank 0 (the learner) runs the `TCPStore` server: the one it passes as `store` (from
    `host_weight_sync_store`), or else one it starts on `master_port`.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    # wait_for_workers=False: the roll call below waits for every rank, and can be called off.
    if store is None:
        store = TCPStore(master_addr, master_port, world_size, rank == 0, timeout,
                         wait_for_workers=False)
    _roll_call(store, rank, world_size, timeout_s)
    group = ProcessGroup(store, rank, world_size)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        impl = ProcessGroupGloo(store, rank, world_size,
                                timedelta(seconds=min(timeout_s, MESH_TIMEOUT_S)))
        impl.set_timeout(timeout)  # for the broadcasts
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
    return padded(math.prod(shape) * dtype.itemsize)


def _group_sizes(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of `sizes` (skipping zeros), in order, in runs of at most `bucket_bytes` bytes.

    `bucket_bytes <= 0` means one item per bucket; an item larger than a bucket gets its own.
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, nbytes in enumerate(sizes):
        if nbytes == 0:
            continue
        if current and (bucket_bytes <= 0 or current_bytes + nbytes > bucket_bytes):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


def plan_buckets(manifest: WeightManifest, bucket_bytes: int) -> list[list[int]]:
    """Group manifest indices, in order, into buckets of at most `bucket_bytes` bytes.

    `bucket_bytes <= 0` means one tensor per bucket. A tensor larger than a bucket gets a bucket
    of its own. Sender and receivers call this with the same inputs and get the same plan.
    """
    sizes = [max(_padded_nbytes(shape, dtype_from_name(dtype)), ALIGN_BYTES)
             for _, shape, dtype in manifest]
    return _group_sizes(sizes, bucket_bytes)


# A transfer is a list of buckets; a bucket is a list of segments (manifest index, byte offset in
# the bucket, bytes), each segment one tensor's payload: its values (full sync) or its encoded
# changes (delta sync). Both ends derive the same layout from data they share.
Segment = tuple[int, int, int]


def _layout(sizes: list[int], bucket_bytes: int) -> list[tuple[list[Segment], int]]:
    """Buckets of (index, offset, bytes) for payloads of `sizes` bytes, and each bucket's size."""
    slots = [padded(n) for n in sizes]
    layout = []
    for bucket in _group_sizes(slots, bucket_bytes):
        segments, total = [], 0
        for index in bucket:
            segments.append((index, total, sizes[index]))
            total += slots[index]
        layout.append((segments, total))
    return layout


def full_layout(manifest: WeightManifest, bucket_bytes: int) -> list[tuple[list[Segment], int]]:
    sizes = [math.prod(shape) * dtype_from_name(dtype).itemsize for _, shape, dtype in manifest]
    # Empty tensors still get a (64-byte) slot, so every manifest entry lands in some bucket.
    return _layout([max(n, 1) for n in sizes], bucket_bytes)


class _Buffers:
    """Reused byte buffers for buckets: fresh ones cost more to page in than the cast or copy
    into them (measured: casting SmolLM2's masters into fresh bf16 tensors 0.20 s, into
    reused ones 0.03 s). `count` buffers rotate, so the wire can fill or drain one while the
    caller works on another."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.slots: list[torch.Tensor | None] = [None] * count
        self.device = device

    def get(self, slot: int, nbytes: int) -> torch.Tensor:
        slot %= len(self.slots)
        buffer = self.slots[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.slots[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buffer[:nbytes]


def wire_device(group: ProcessGroup) -> torch.device:
    """Where tensors must live to be sent: NCCL moves CUDA memory only, gloo host memory.

    Staging on this device lets a learner hand over whatever it has (CUDA parameters, or a
    CPU-offloaded full state dict) with either backend.
    """
    if group.name() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def digests(tensors: Iterable[torch.Tensor], manifest: WeightManifest) -> list[str]:
    """Per manifest entry, a hash of the tensor's bytes in its wire dtype: two ends that hold
    the same digests hold the same weights bit for bit."""
    out = []
    for tensor, (_, _, dtype) in zip(tensors, manifest, strict=True):
        wire = tensor.detach().to(dtype_from_name(dtype)).contiguous().reshape(-1).cpu()
        out.append(hashlib.sha256(wire.view(torch.uint8).numpy().tobytes()).hexdigest()[:16])
    return out


# --- sending -------------------------------------------------------------------------------------

class WeightSender:
    """Rank 0's end of the weight sync, kept across syncs.

    A full sync casts each tensor to its wire dtype straight into a reused bucket buffer and
    broadcasts it asynchronously, so the next bucket is cast while the last one is on the wire
    (two buffers rotate). `stage` does the cast ahead of time instead, into one kept buffer per
    bucket (the model's size in the wire dtype), after which `send_full` only sends: the cast
    then leaves the window in which the engines wait. With `keep_held`, the sender also keeps
    what the receivers hold (the wire-dtype values last sent: one bucket buffer per bucket, the
    model's size in the wire dtype), which a delta sync needs: it sends per tensor only the
    values whose bits differ, as the smallest of full values, int32 indices + values, or a
    bitmask + values (nothing for an unchanged tensor). A small header of (encoding, count) per
    tensor goes first, from which the receivers derive the same bucket layout.
    """

    def __init__(self, manifest: WeightManifest, bucket_bytes: int, device: torch.device,
                 keep_held: bool = False) -> None:
        self.manifest = manifest
        self.bucket_bytes = bucket_bytes
        self.device = device
        self.layout = full_layout(manifest, bucket_bytes)
        self.keep_held = keep_held
        self.holds = False  # receivers hold exactly `held` (a full sync went out since)
        self.staged = False  # the bucket buffers hold the values `stage` was given
        self._full = _Buffers(len(self.layout) if keep_held else 2, device)
        self._delta = _Buffers(2, device)
        self._views: dict[int, torch.Tensor] = {}
        self._stage: torch.Tensor | None = None  # one tensor in the wire dtype, to compare
        self._mask: torch.Tensor | None = None

    def _check(self, tensors: Iterator[tuple[str, torch.Tensor]], index: int) -> torch.Tensor:
        name, shape, _ = self.manifest[index]
        try:
            got_name, tensor = next(tensors)
        except StopIteration:
            raise ValueError(f"named_tensors ended before manifest entry {name!r}") from None
        if got_name != name or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {name} {shape}, got {got_name} {tuple(tensor.shape)}")
        return tensor.detach()

    def _wire_view(self, buffer: torch.Tensor, index: int, offset: int) -> torch.Tensor:
        _, shape, dtype = self.manifest[index]
        return typed(buffer[offset:], dtype_from_name(dtype), math.prod(shape)).view(shape)

    def send_full(self, group: ProcessGroup,
                  named_tensors: Iterable[tuple[str, torch.Tensor]] | None,
                  src: int = 0) -> dict[str, float]:
        """Every tensor, cast to its wire dtype, to every other rank (`receive_full`); with
        `named_tensors=None`, the values of the last `stage`, already cast."""
        if named_tensors is None:
            if not self.staged:
                raise RuntimeError("send_full(None) before stage: nothing is staged")
            with single_threaded(self.device):
                timer = PhaseTimer()
                sent = self._stream(group, self.layout, self._full, lambda *_: None, timer, src)
            return _sync_stats(timer, sent, buckets=len(self.layout), changed_frac=1.0)
        self.staged = False  # the buffers are about to hold other values
        with single_threaded(self.device):
            return self._send_full(group, iter(named_tensors), src)

    def stage(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Cast every tensor to its wire dtype into its bucket now, for a `send_full(None)`
        later; returns the seconds it took. The caller must stage again whenever the tensors
        change (the sender cannot tell). Uses torch's threads: it runs while no sync does."""
        if self.keep_held:
            raise RuntimeError("stage with keep_held: a delta sync diffs against the buffers")
        t0 = time.perf_counter()
        if len(self._full.slots) < len(self.layout):
            self._full = _Buffers(len(self.layout), self.device)
        self.staged = False
        tensors = iter(named_tensors)
        for number, (segments, total) in enumerate(self.layout):
            self._fill(self._full.get(number, total), segments, tensors)
        if next(tensors, None) is not None:
            raise ValueError("named_tensors has more entries than the manifest")
        _synchronize(self.device)
        self.staged = True
        return time.perf_counter() - t0

    def _fill(self, buffer: torch.Tensor, segments: list[Segment],
              tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        for index, offset, _ in segments:
            view = self._wire_view(buffer, index, offset)
            view.copy_(self._check(tensors, index))  # casts and moves in one pass
            if self.keep_held:
                self._views[index] = view

    def _send_full(self, group: ProcessGroup, tensors: Iterator[tuple[str, torch.Tensor]],
                   src: int) -> dict[str, float]:
        timer = PhaseTimer()
        sent = self._stream(group, self.layout, self._full,
                            lambda buffer, segments: self._fill(buffer, segments, tensors),
                            timer, src)
        if next(tensors, None) is not None:
            raise ValueError("named_tensors has more entries than the manifest")
        self.holds = self.keep_held
        return _sync_stats(timer, sent, buckets=len(self.layout), changed_frac=1.0)

    def _stream(self, group: ProcessGroup, layout: list[tuple[list[Segment], int]],
                buffers: _Buffers, fill: Callable[[torch.Tensor, list[Segment]], None],
                timer: PhaseTimer, src: int) -> int:
        """Broadcast each bucket of `layout` once `fill` has written it into its buffer: the
        next bucket is filled while the last is on the wire, and a buffer is refilled only
        after its previous broadcast has left. Returns the bytes sent."""
        pending: list[Any] = [None] * len(buffers.slots)
        sent = 0
        for number, (segments, total) in enumerate(layout):
            slot = number % len(pending)
            if pending[slot] is not None:
                with timer.phase("transfer_s"):
                    pending[slot].wait()
            buffer = buffers.get(number, total)
            with timer.phase("convert_s"):
                fill(buffer, segments)
            pending[slot] = group.broadcast(buffer, src)
            sent += total
        with timer.phase("transfer_s"):
            for work in pending:
                if work is not None:
                    work.wait()
            _synchronize(self.device)
        return sent

    def send_delta(self, group: ProcessGroup, named_tensors: Iterable[tuple[str, torch.Tensor]],
                   src: int = 0) -> dict[str, float]:
        """Only what changed since the last send (`receive_delta`); needs a full send first."""
        if not self.holds:
            raise RuntimeError("send_delta before a full send: the receivers' weights are unknown")
        return self._send_delta(group, iter(named_tensors), src)

    def _send_delta(self, group: ProcessGroup, tensors: Iterator[tuple[str, torch.Tensor]],
                    src: int) -> dict[str, float]:
        timer = PhaseTimer()
        header = torch.zeros(len(self.manifest), 2, dtype=torch.int64)
        # index → (positions of the changed values, bitmask or None); values are read from
        # `held` once it holds the new ones.
        encoded: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        changed_total = numel_total = 0
        with timer.phase("convert_s"):
            for index in range(len(self.manifest)):
                tensor = self._check(tensors, index)
                held = self._views[index].view(-1)
                nbytes = held.numel() * held.element_size()
                if self._stage is None or self._stage.numel() < nbytes:
                    self._stage = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8,
                                              device=self.device)
                    self._mask = torch.empty(self._stage.numel(), dtype=torch.bool,
                                             device=self.device)
                new = typed(self._stage, held.dtype, held.numel())
                new.copy_(tensor.reshape(-1))
                mask = self._mask[:held.numel()]
                torch.ne(as_bits(new), as_bits(held), out=mask)
                changed = int(torch.count_nonzero(mask))
                encoding = choose_encoding(changed, held.numel(), held.element_size())
                header[index, 0], header[index, 1] = encoding, changed
                if encoding in (INDEX, MASK):
                    encoded[index] = (mask.nonzero()[:, 0],
                                      pack_bits(mask) if encoding == MASK else None)
                if changed:
                    held.copy_(new)  # the receivers will hold exactly this
                changed_total += changed
                numel_total += held.numel()
        if next(tensors, None) is not None:
            raise ValueError("named_tensors has more entries than the manifest")
        with timer.phase("transfer_s"):
            group.broadcast(header.to(self.device), src).wait()
        layout = _delta_layout(self.manifest, header.tolist(), self.bucket_bytes)

        def fill(buffer: torch.Tensor, segments: list[Segment]) -> None:
            for index, offset, nbytes in segments:
                self._encode_into(buffer[offset:offset + nbytes], index,
                                  int(header[index, 0]), encoded.pop(index, None))

        with single_threaded(self.device):
            sent = self._stream(group, layout, self._delta, fill, timer, src)
        return _sync_stats(timer, sent + header.numel() * header.element_size(),
                           buckets=len(layout), changed_frac=changed_total / max(numel_total, 1))

    def _encode_into(self, out: torch.Tensor, index: int, encoding: int,
                     positions: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        held = self._views[index].view(-1)
        if encoding == FULL:
            typed(out, held.dtype, held.numel()).copy_(held)
            return
        assert positions is not None
        where, bits = positions
        if encoding == INDEX:
            typed(out, torch.int32, where.numel()).copy_(where)
        else:
            out[:bits.numel()].copy_(bits)
        start = padded(out.numel() - where.numel() * held.element_size())
        torch.index_select(held, 0, where, out=typed(out[start:], held.dtype, where.numel()))


def _delta_layout(manifest: WeightManifest, header: list[list[int]],
                  bucket_bytes: int) -> list[tuple[list[Segment], int]]:
    sizes = [delta_nbytes(encoding, changed, math.prod(shape), dtype_from_name(dtype).itemsize)
             for (encoding, changed), (_, shape, dtype) in zip(header, manifest, strict=True)]
    return _layout(sizes, bucket_bytes)


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """One CPU thread for torch's work on host buffers during a sync: the transport's own
    threads (gloo's send and receive) need cores too, and an OpenMP team spinning on them
    slows every party down (measured on 2 cores, SmolLM2 to one engine: 0.71x -> 0.77x of a
    raw gloo broadcast once the engine's loading also ran on one thread)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        # NCCL's wait() returns before the transfer ends; sync so the seconds are the real cost.
        torch.cuda.current_stream(device).synchronize()


def _sync_stats(timer: PhaseTimer, sent: int, **extra: float) -> dict[str, float]:
    """A send's figures for logging: bytes on the wire, seconds in all, and the split."""
    return {"bytes": float(sent), "seconds": timer.total(),
            "convert_s": timer.seconds.get("convert_s", 0.0),
            "transfer_s": timer.seconds.get("transfer_s", 0.0),
            **{key: float(value) for key, value in extra.items()}}


def broadcast_weights(
    group: ProcessGroup,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    manifest: WeightManifest,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    src: int = 0,
) -> dict[str, float]:
    """Send `named_tensors` (in manifest order) to every other rank of `group`, once.

    Each tensor is cast to its manifest dtype and staged on the backend's device (CUDA for NCCL,
    host for gloo) on the way; `dtype`, if given, must agree with the manifest's floating-point
    entries (it lets a caller assert the wire dtype it expects). `named_tensors` may be a lazy
    iterator (e.g. gathering one sharded parameter at a time): it is consumed bucket by bucket.
    A learner that syncs repeatedly keeps a `WeightSender` instead, which reuses its buffers.

    Returns {"bytes", "seconds", "buckets", "convert_s", "transfer_s"} for logging.
    """
    if dtype is not None:
        mismatched = [name for name, _, wire in manifest
                      if wire != dtype_name(dtype) and dtype_from_name(wire).is_floating_point]
        if mismatched:
            raise ValueError(f"manifest wire dtype differs from {dtype} for {mismatched[:3]}")
    sender = WeightSender(manifest, bucket_bytes, wire_device(group))
    return sender.send_full(group, named_tensors, src)


# --- receiving -----------------------------------------------------------------------------------

class WeightReceiver:
    """An engine's end of the weight sync: yields each tensor's payload as its bucket lands.

    Buckets arrive in two reused buffers: the next bucket is already on the wire while the
    caller loads the tensors of the last one, which must be consumed (copied or applied)
    before the caller asks for the next item.
    """

    def __init__(self, manifest: WeightManifest, bucket_bytes: int,
                 device: torch.device | str = "cpu",
                 full_buffers: list[torch.Tensor] | None = None) -> None:
        self.manifest = manifest
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)
        self._buffers = _Buffers(2, self.device)
        # Where full syncs land, one buffer per bucket, if the caller keeps them (the engine's
        # weights may be views of them); else they rotate through `_buffers` like deltas.
        self.full_buffers = full_buffers or None
        self.wait_s = 0.0  # time spent waiting for the wire in the last receive

    def _receive(self, group: ProcessGroup, layout: list[tuple[list[Segment], int]],
                 src: int, buffers: list[torch.Tensor] | None = None
                 ) -> Iterator[tuple[list[Segment], torch.Tensor]]:
        self.wait_s = 0.0
        pending = None
        for number, (segments, total) in enumerate(layout):
            buffer = buffers[number] if buffers else self._buffers.get(number, total)
            work = group.broadcast(buffer, src)
            if pending is not None:
                yield pending  # the caller loads the last bucket while this one arrives
            t0 = time.perf_counter()
            work.wait()
            _synchronize(self.device)
            self.wait_s += time.perf_counter() - t0
            pending = (segments, buffer)
        if pending is not None:
            yield pending

    def receive_full(self, group: ProcessGroup, src: int = 0
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """(manifest index, tensor) for every entry of a `send_full`; each tensor is a view
        into a reused buffer, valid until the next item is asked for."""
        layout = full_layout(self.manifest, self.bucket_bytes)
        for segments, buffer in self._receive(group, layout, src, self.full_buffers):
            for index, offset, _ in segments:
                _, shape, dtype = self.manifest[index]
                yield index, typed(buffer[offset:], dtype_from_name(dtype),
                                    math.prod(shape)).view(shape)

    def receive_delta(self, group: ProcessGroup, src: int = 0
                      ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """(manifest index, encoding, changed count, payload bytes) per changed tensor of a
        `send_delta`, for `apply_delta`; payloads are valid until the next item."""
        header = torch.empty(len(self.manifest), 2, dtype=torch.int64, device=self.device)
        group.broadcast(header, src).wait()
        codes = header.tolist()
        layout = _delta_layout(self.manifest, codes, self.bucket_bytes)
        for segments, buffer in self._receive(group, layout, src):
            for index, offset, nbytes in segments:
                yield index, codes[index][0], codes[index][1], buffer[offset:offset + nbytes]


def receive_weights(
    group: ProcessGroup,
    manifest: WeightManifest,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str = "cpu",
    src: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive one `broadcast_weights` / `send_full`, yielding (name, tensor) as buckets land.

    Unlike `WeightReceiver`, every bucket gets a fresh buffer, so a consumer may keep references
    (vLLM's layerwise reload buffers a layer's weights until the layer is complete). The
    iterator must be consumed to the end, or the ranks fall out of step.
    """
    for segments, total in full_layout(manifest, bucket_bytes):
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
        group.broadcast(buffer, src).wait()
        for index, offset, _ in segments:
            name, shape, dtype = manifest[index]
            yield name, typed(buffer[offset:], dtype_from_name(dtype),
                               math.prod(shape)).view(shape)
