"""Weight sync: exact bucket round trips, and a real 2-process gloo broadcast with timeouts."""

import multiprocessing as mp
import pickle
import time

import numpy as np
import pytest
import torch

from coordexp_rl.rollout.weight_transport import (
    BroadcastTransport,
    Bucket,
    ObjectStoreTransport,
    TensorSpec,
    WeightPayload,
    WeightSyncError,
    init_weight_group,
    iter_buckets,
    pack_buckets,
    unpack_all,
    unpack_bucket,
)
from learner.distributed import free_port

CTX = mp.get_context("spawn")


def sample_weights() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and awkward shapes; deterministic so both processes can rebuild them."""
    g = torch.Generator().manual_seed(0)
    return [
        ("embed.weight", torch.randn(7, 5, generator=g)),  # float32, 140 bytes
        ("layer.0.w_t", torch.randn(6, 4, generator=g).t()),  # non-contiguous float32, 96 bytes
        ("layer.0.b", torch.randn(4, generator=g).to(torch.bfloat16)),  # 8 bytes
        ("scale", torch.tensor(0.5)),  # 0-dim float32, 4 bytes
        ("empty", torch.zeros(0, 3)),  # no elements
        ("steps", torch.tensor([3, -2**40], dtype=torch.int64)),  # 16 bytes
        ("head.weight", torch.randn(3, 5, generator=g).to(torch.bfloat16)),  # 30 bytes
    ]


def assert_same(got, expected):
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (name, a), (_, b) in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_pack_unpack_round_trip_exact():
    weights = sample_weights()
    buckets = pack_buckets(weights, bucket_bytes=1 << 20)
    # consecutive runs of one dtype: a dtype change closes the bucket
    assert [b.dtype for b in buckets] == ["float32", "bfloat16", "float32", "int64", "bfloat16"]
    assert [b.flat().numel() for b in buckets] == [35 + 24, 4, 1 + 0, 2, 15]
    assert_same(unpack_all(buckets), weights)
    spec = buckets[0].manifest[1]
    assert spec == TensorSpec("layer.0.w_t", (4, 6), "float32", 35, 24)


def test_bucket_size_limit():
    # float32: 140 + 96 > 150 -> split; the 140-byte tensor alone fits; bigger tensors get their own bucket
    weights = [("a", torch.ones(35)), ("b", torch.ones(24)), ("c", torch.ones(1)), ("d", torch.ones(100))]
    buckets = pack_buckets(weights, bucket_bytes=150)
    assert [[s.name for s in b.manifest] for b in buckets] == [["a"], ["b", "c"], ["d"]]
    assert [b.nbytes for b in buckets] == [140, 100, 400]
    assert_same(unpack_all(buckets), weights)


def test_cast_to_the_engine_dtype_halves_the_bytes_and_keeps_integers():
    weights = sample_weights()
    buckets = pack_buckets(weights, bucket_bytes=1 << 20, dtype="bfloat16")
    assert [b.dtype for b in buckets] == ["bfloat16", "int64", "bfloat16"]  # int64 stays int64
    float_bytes = sum(t.numel() * 2 for _, t in weights if t.is_floating_point())
    assert sum(b.nbytes for b in buckets) == float_bytes + 16
    got = dict(unpack_all(buckets))
    for name, t in weights:
        expected = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name


def test_buckets_are_built_one_at_a_time():
    """The generator packs bucket k+1 only when asked: the sender never holds two packed buckets."""
    packed = []

    def named():
        for i in range(4):
            packed.append(i)
            yield f"w{i}", torch.ones(10, dtype=torch.float64)

    stream = iter_buckets(named(), bucket_bytes=80, dtype="float32")  # 40 bytes each as float32: 2 per bucket
    first = next(stream)
    assert [s.name for s in first.manifest] == ["w0", "w1"] and packed == [0, 1, 2]  # w2 opened bucket 2
    assert [s.name for s in next(stream).manifest] == ["w2", "w3"]


def test_senders_let_each_bucket_go_before_packing_the_next():
    """Bucket k is freed (after its put) before the tensors of bucket k + 1 are even read."""
    import weakref

    shipped: list[weakref.ref] = []

    def named():
        for i in range(6):
            assert all(ref() is None for ref in shipped), f"a shipped bucket is alive while w{i} is read"
            yield f"w{i}", torch.ones(10, dtype=torch.float64)

    payload = ObjectStoreTransport(bucket_bytes=40).send(1, named(), dtype="float32",
                                                         put=lambda b: shipped.append(weakref.ref(b)))
    assert len(shipped) == len(payload.buckets) == 6


def test_pack_rejects_duplicates_and_bad_buckets():
    with pytest.raises(ValueError, match="'w' appears twice"):
        pack_buckets([("w", torch.ones(1)), ("w", torch.ones(1))])
    bucket = pack_buckets([("w", torch.ones(3))])[0]
    with pytest.raises(WeightSyncError, match="manifest says float32 \\(3,\\)"):
        unpack_bucket(Bucket("float32", bucket.manifest, [torch.ones(2)]))


def test_object_store_transport_round_trip():
    weights = sample_weights()
    sender, receiver = ObjectStoreTransport(bucket_bytes=64), ObjectStoreTransport()
    payload = sender.send(9, weights, omitted=["frozen.w"])
    assert isinstance(payload, WeightPayload) and len(payload.buckets) >= 4
    shipped = pickle.loads(pickle.dumps(payload, protocol=5))  # what crossing the object store does
    version, got, omitted = receiver.receive(shipped)
    assert version == 9 and omitted == ("frozen.w",)
    got = dict(got)
    assert_same([(n, got[n]) for n, _ in weights], weights)


def test_bucket_pickles_out_of_band_without_copying_into_the_stream():
    """Protocol 5: the bytes travel as out-of-band buffers (Ray writes them into shared memory once) and
    come back as views of those buffers."""
    w = torch.arange(1000, dtype=torch.float32)
    bucket = pack_buckets([("w", w)])[0]
    buffers = []
    stream = pickle.dumps(bucket, protocol=5, buffer_callback=buffers.append)
    assert len(stream) < 1000 and sum(b.raw().nbytes for b in buffers) == 4000
    back = pickle.loads(stream, buffers=buffers)
    assert torch.equal(back.tensors[0], w)
    assert back.tensors[0].data_ptr() == np.frombuffer(buffers[0].raw(), dtype=np.uint8).ctypes.data  # a view


def test_object_store_send_puts_each_bucket_as_it_is_built():
    put = []
    payload = ObjectStoreTransport(bucket_bytes=64).send(1, sample_weights(), put=lambda b: put.append(b) or len(put))
    assert payload.buckets == list(range(1, len(put) + 1))  # the payload holds what put returned


def peer(role: str, port: int, out_path: str, release) -> None:
    """The other process. Roles: receiver | idle_sender (never sends) | partial_sender."""
    rank = 1 if role == "receiver" else 0
    group = init_weight_group("127.0.0.1", port, rank, 2, "gloo", timeout_s=60)
    transport = BroadcastTransport(group, bucket_bytes=128)
    if role == "receiver":
        version, named, omitted = transport.receive()
        torch.save({"version": version, "named": named, "omitted": omitted,
                    "device_bytes": transport.peak_device_bytes, "wire_kept": transport.wire is not None}, out_path)
    elif role == "partial_sender":
        transport.send_bucket(5, 0, pack_buckets(sample_weights(), 128)[0])
    release.wait(60)  # idle until the parent is done with the group


def start_peer(role: str, port: int, out_path: str = ""):
    release = CTX.Event()
    proc = CTX.Process(target=peer, args=(role, port, out_path, release), daemon=True)
    proc.start()
    return proc, release


def test_broadcast_two_processes_exact(tmp_path):
    port, out = free_port(), str(tmp_path / "received.pt")
    proc, release = start_peer("receiver", port, out)
    group = init_weight_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=60)
    weights = sample_weights()
    BroadcastTransport(group, bucket_bytes=128).send(4, weights, omitted=["frozen.w"])
    release.set()
    proc.join(60)
    assert proc.exitcode == 0
    received = torch.load(out)
    assert received["version"] == 4 and received["omitted"] == ("frozen.w",)
    got = dict(received["named"])
    assert_same([(n, got[n]) for n, _ in weights], weights)
    # The receiver held one bucket on its device at a time (the largest), not the sync: on a GPU engine
    # the rest waits in host memory. Nothing stays on the device after the sync.
    sizes = [b.nbytes for b in pack_buckets(weights, 128)]
    assert len(sizes) >= 3 and received["device_bytes"] == max(sizes) < sum(sizes)
    assert not received["wire_kept"]


@pytest.mark.parametrize("role", ["idle_sender", "partial_sender"])
def test_receiver_times_out_and_keeps_nothing(role):
    port = free_port()
    proc, release = start_peer(role, port)
    try:
        group = init_weight_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=60)
        group.timeout_s = 1.0  # the rendezvous waited for the spawn; the sync itself must be quick
        transport = BroadcastTransport(group, bucket_bytes=128)
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="failed within 1 s") as err:  # raises: no tensor is returned
            transport.receive()
        assert time.monotonic() - start < 5.0
        assert group.broken.startswith("broadcast of ")  # marked broken: it refuses every later receive (below)
        if role == "partial_sender":  # bucket 0 arrived, then neither bucket 1 nor the end header
            assert "bucket 1 header" in str(err.value)
        with pytest.raises(WeightSyncError, match="group is broken"):
            transport.receive()
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0


def test_group_that_never_forms_raises():
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="did not form within 1 s"):
        init_weight_group("127.0.0.1", free_port(), 1, 2, "gloo", timeout_s=1.0)
    assert time.monotonic() - start < 10.0
