"""Weight broadcast: bucket planning (pure) and a real two-process gloo broadcast."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from rlsys.weight_delta import (
    FULL,
    INDEX,
    MASK,
    SKIP,
    apply_delta,
    choose_encoding,
    delta_nbytes,
    pack_bits,
    unpack_bits,
)
from rlsys.weight_sync import (
    WeightReceiver,
    WeightSender,
    WeightSyncJoinAborted,
    abort_weight_sync_join,
    broadcast_weights,
    build_manifest,
    close_weight_sync_group,
    dtype_from_name,
    find_free_port,
    host_weight_sync_store,
    init_weight_sync_group,
    plan_buckets,
    receive_weights,
)


def _manifest(*sizes: int, dtype: str = "float32") -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"t{i}", (size,), dtype) for i, size in enumerate(sizes)]


def test_plan_buckets_zero_means_one_tensor_per_bucket() -> None:
    assert plan_buckets(_manifest(1, 2, 3), 0) == [[0], [1], [2]]


def test_plan_buckets_groups_in_order_and_isolates_oversized_tensors() -> None:
    # 16 float32 = 64 bytes each (exactly one alignment unit); 1000 floats = 4000 -> 4032 bytes.
    manifest = _manifest(16, 16, 16, 1000, 16, 16)
    assert plan_buckets(manifest, 128) == [[0, 1], [2], [3], [4, 5]]
    assert plan_buckets(manifest, 10_000) == [[0, 1, 2, 3, 4, 5]]
    assert plan_buckets(manifest, 128) == plan_buckets(list(manifest), 128)


def test_plan_buckets_counts_alignment_padding() -> None:
    # 3 floats are 12 bytes but occupy one 64-byte slot in a packed bucket.
    assert plan_buckets(_manifest(3, 3, 3), 128) == [[0, 1], [2]]


def test_build_manifest_casts_floats_only() -> None:
    tensors = [("w", torch.zeros(2, 3)), ("step", torch.zeros(4, dtype=torch.int64))]
    assert build_manifest(tensors, torch.bfloat16) == [
        ("w", (2, 3), "bfloat16"), ("step", (4,), "int64")]
    assert build_manifest(tensors) == [("w", (2, 3), "float32"), ("step", (4,), "int64")]


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(300, 17, generator=generator),  # 20 KB: bigger than small buckets
        "scalar": torch.randn((), generator=generator),
        "norm": torch.randn(17, generator=generator),
        "empty": torch.zeros(0, 4),
        "positions": torch.arange(11, dtype=torch.int64),
        "proj": torch.randn(5, 7, generator=generator),
    }


BUCKET_SIZES = (0, 256, 4096, 1 << 20)


def _wire(state: dict[str, torch.Tensor], manifest: list) -> list[torch.Tensor]:
    """The tensors of `state` as the wire carries them (each in its manifest dtype)."""
    return [t.to(dtype_from_name(d)) for t, (_, _, d) in
            zip(state.values(), manifest, strict=True)]


def _assert_bitwise_equal(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]
                          ) -> None:
    for got_step, want_step in zip(got, want, strict=True):
        for a, b in zip(got_step, want_step, strict=True):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_two_process_broadcast_is_bit_exact(ray_cluster) -> None:
    ray = ray_cluster

    # Defined inside the test so Ray ships it by value: Ray workers cannot import test modules.
    def receiver(port: int, manifest, bucket_sizes) -> list[dict[str, torch.Tensor]]:
        group = init_weight_sync_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=60)
        return [{name: tensor.clone() for name, tensor in receive_weights(group, manifest, size)}
                for size in bucket_sizes]

    state = _state_dict()
    # bf16 on the wire for floats (as a learner would send), int64 untouched.
    manifest = build_manifest(state.items(), torch.bfloat16)
    # Rank 0 hosts the rendezvous as the learner does: on a port the OS gives its server.
    store = host_weight_sync_store("127.0.0.1", timeout_s=60)
    received_ref = ray.remote(num_cpus=0)(receiver).remote(store.port, manifest, BUCKET_SIZES)
    try:
        group = init_weight_sync_group("gloo", "127.0.0.1", store.port, 0, 2, timeout_s=60,
                                       store=store)
    except Exception:
        ray.get(received_ref, timeout=10)  # surfaces the receiver's own error, if it had one
        raise
    stats = [broadcast_weights(group, state.items(), manifest, size, dtype=torch.bfloat16)
             for size in BUCKET_SIZES]
    received = ray.get(received_ref, timeout=120)

    assert [s["buckets"] for s in stats] == [
        len(plan_buckets(manifest, size)) for size in BUCKET_SIZES]
    assert stats[0]["buckets"] == len(state) and stats[-1]["buckets"] == 1
    for by_name in received:
        assert list(by_name) == list(state)
        for name, original in state.items():
            expected = original.to(torch.bfloat16) if original.is_floating_point() else original
            assert by_name[name].dtype == expected.dtype and by_name[name].shape == expected.shape
            assert torch.equal(by_name[name], expected), name


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """Ports from bind(0) are the ones outgoing connections use too, so one could be taken
    before the rendezvous binds it; find_free_port draws from below that range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {find_free_port() for _ in range(20)}
    assert all(20000 <= port < low for port in ports) and len(ports) > 1


def test_a_join_called_off_returns_at_once_and_a_timeout_names_the_missing_rank() -> None:
    """Rank 1 never comes (its process died before joining): rank 0 would otherwise wait in
    the backend's rendezvous for the whole timeout. Called off, it raises within a poll
    interval; left alone, its timeout says which rank is missing."""
    store = host_weight_sync_store("127.0.0.1", timeout_s=120)
    outcome: list[BaseException] = []

    def join() -> None:
        try:
            init_weight_sync_group("gloo", "127.0.0.1", store.port, 0, 2, timeout_s=120,
                                   store=store)
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=join)
    thread.start()
    time.sleep(0.5)  # rank 0 is waiting for rank 1 by now
    assert thread.is_alive()
    t0 = time.monotonic()
    assert abort_weight_sync_join("127.0.0.1", store.port, "rank 1 died")
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(outcome[0], WeightSyncJoinAborted) and "rank 1 died" in str(outcome[0])

    lone = host_weight_sync_store("127.0.0.1", timeout_s=10)
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1, 2\] did not join"):
        init_weight_sync_group("gloo", "127.0.0.1", lone.port, 0, 3, timeout_s=0.5, store=lone)
    # Nobody listens where a dead host's rendezvous was: the call-off reports it, no raise.
    assert not abort_weight_sync_join("127.0.0.1", find_free_port(), "too late")


def test_a_rank_that_dies_after_checking_in_holds_the_others_only_for_the_mesh_timeout(
        monkeypatch) -> None:
    """Rank 1 checks in and dies before gloo connects: rank 0 gives up after MESH_TIMEOUT_S,
    not after the group's timeout (which its broadcasts keep)."""
    import rlsys.weight_sync as weight_sync

    monkeypatch.setattr(weight_sync, "MESH_TIMEOUT_S", 1.0)
    store = host_weight_sync_store("127.0.0.1", timeout_s=120)
    store.set("rlsys/present/1", "1")  # rank 1's check-in, and then nothing
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        init_weight_sync_group("gloo", "127.0.0.1", store.port, 0, 2, timeout_s=120,
                               store=store)
    assert time.monotonic() - t0 < 10


def test_broadcast_rejects_tensors_that_do_not_match_the_manifest() -> None:
    port = find_free_port()
    group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, 1, timeout_s=10)
    manifest = build_manifest([("a", torch.zeros(2))])
    with pytest.raises(ValueError, match="expected a"):
        broadcast_weights(group, [("b", torch.zeros(2))], manifest, 0)
    with pytest.raises(ValueError, match="more entries"):
        broadcast_weights(group, [("a", torch.zeros(2)), ("b", torch.zeros(2))], manifest, 0)
    with pytest.raises(ValueError, match="wire dtype"):
        broadcast_weights(group, [("a", torch.zeros(2))], manifest, 0, dtype=torch.bfloat16)


def test_group_re_forms_at_another_world_size(ray_cluster) -> None:
    """What adding an engine does: every member closes the fixed-size group, then all (the
    old member and the new one) join a group of the new size on a fresh port, and both
    receive the next broadcast exactly."""
    ray = ray_cluster

    class Member:  # defined here so Ray ships it by value
        def __init__(self) -> None:
            self.group = None

        def join(self, port: int, rank: int, world: int) -> int:
            self.group = init_weight_sync_group("gloo", "127.0.0.1", port, rank, world,
                                                timeout_s=60)
            return self.group.size()

        def receive(self, manifest) -> dict[str, torch.Tensor]:
            return {name: t.clone() for name, t in receive_weights(self.group, manifest, 256)}

        def close(self) -> None:
            close_weight_sync_group(self.group)
            self.group = None

    remote = ray.remote(num_cpus=0)(Member)
    state = _state_dict()
    manifest = build_manifest(state.items())

    def form(members: list) -> object:
        port = find_free_port()
        joined = [m.join.remote(port, rank, len(members) + 1)
                  for rank, m in enumerate(members, start=1)]
        group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, len(members) + 1,
                                       timeout_s=60)
        assert ray.get(joined, timeout=60) == [len(members) + 1] * len(members)
        return group

    def send(group: object, members: list) -> None:
        got = [m.receive.remote(manifest) for m in members]
        broadcast_weights(group, state.items(), manifest, 256)
        for by_name in ray.get(got, timeout=60):
            assert all(torch.equal(by_name[name], state[name]) for name in state)

    first = remote.remote()
    group = form([first])
    send(group, [first])
    ray.get(first.close.remote())
    close_weight_sync_group(group)
    second = remote.remote()
    for members in ([first, second], [first]):  # grow to 2 receivers, then shrink back
        group = form(members)
        send(group, members)
        ray.get([m.close.remote() for m in members])
        close_weight_sync_group(group)
    for member in (first, second):
        ray.kill(member)


def test_choose_encoding_takes_the_smallest_payload() -> None:
    n = 4096  # bf16 values: full = 8192 bytes
    assert choose_encoding(0, n, 2) == SKIP
    assert choose_encoding(10, n, 2) == INDEX    # 64 + 20 bytes
    assert choose_encoding(400, n, 2) == MASK    # 512 + 800 < 1600 + 800
    assert choose_encoding(4000, n, 2) == FULL   # 512 + 8000 > 8192
    assert delta_nbytes(FULL, n, n, 2) == 8192


def test_bitmask_round_trip() -> None:
    mask = torch.rand(1001, generator=torch.Generator().manual_seed(0)) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == 126
    assert torch.equal(unpack_bits(bits, 1001), mask)


def test_delta_sync_is_bit_exact_across_encodings() -> None:
    """A sender and a receiver (two ranks in two threads): a full send, then deltas that take
    every encoding (index, bitmask, full, skipped), each leaving the receiver bitwise equal to
    the sender's tensors in the wire dtype, including -0.0 and NaN changes."""
    import threading

    state = _state_dict() | {"big": torch.randn(5000, generator=torch.Generator().manual_seed(1))}
    manifest = build_manifest(state.items(), torch.bfloat16)
    port = find_free_port()
    held: list[list[torch.Tensor]] = []

    def receive() -> None:
        group = init_weight_sync_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=60)
        receiver = WeightReceiver(manifest, 4096)
        store = [torch.empty(shape, dtype=dtype_from_name(dtype)) for _, shape, dtype in manifest]
        for index, tensor in receiver.receive_full(group):
            store[index].copy_(tensor)
        for _ in range(3):
            for index, encoding, count, payload in receiver.receive_delta(group):
                apply_delta(store[index], encoding, count, payload)
            held.append([t.clone() for t in store])

    thread = threading.Thread(target=receive)
    thread.start()
    group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=60)
    sender = WeightSender(manifest, 4096, torch.device("cpu"), keep_held=True)
    with pytest.raises(RuntimeError, match="before a full send"):
        sender.send_delta(group, state.items())
    full = sender.send_full(group, state.items())
    sent = []
    with torch.no_grad():
        for step in range(3):
            state["embed"][step, :3] += 1.0                   # a few values: index
            state["big"][::step + 2] += 0.5                   # many: bitmask, then full
            state["norm"][0] = [-0.0, float("nan"), 0.0][step]  # bit-level changes
            stats = sender.send_delta(group, state.items())
            assert 0 < stats["changed_frac"] < 1 and stats["bytes"] < full["bytes"]
            sent.append(_wire(state, manifest))
    thread.join(timeout=60)
    assert not thread.is_alive() and len(held) == 3
    _assert_bitwise_equal(held, sent)


def test_a_staged_send_carries_the_values_of_the_stage_not_later_ones() -> None:
    """`stage` casts ahead (learner.stage_weights); `send_full(None)` then sends exactly the
    staged values, bitwise, even after the tensors changed, as often as asked; a send of
    tensors replaces what is staged. Sending nothing staged, or staging for a delta sender,
    fails with its reason."""
    state = _state_dict()
    manifest = build_manifest(state.items(), torch.bfloat16)
    port = find_free_port()
    got: list[list[torch.Tensor]] = []

    def receive() -> None:
        group = init_weight_sync_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=60)
        receiver = WeightReceiver(manifest, 256)
        for _ in range(3):
            got.append([t.clone() for _, t in receiver.receive_full(group)])

    thread = threading.Thread(target=receive)
    thread.start()
    group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=60)
    sender = WeightSender(manifest, 256, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="nothing is staged"):
        sender.send_full(group, None)
    assert sender.stage(state.items()) > 0 and sender.staged
    staged = _wire(state, manifest)
    with torch.no_grad():
        state["embed"] += 1.0  # the learner's next step; the staged values must not follow
    sender.send_full(group, None)
    stats = sender.send_full(group, None)
    assert stats["buckets"] == len(plan_buckets(manifest, 256))
    sender.send_full(group, state.items())
    assert not sender.staged
    thread.join(timeout=60)
    assert not thread.is_alive() and len(got) == 3
    _assert_bitwise_equal(got, [staged, staged, _wire(state, manifest)])
    with pytest.raises(RuntimeError, match="keep_held"):
        WeightSender(manifest, 256, torch.device("cpu"), keep_held=True).stage(state.items())
