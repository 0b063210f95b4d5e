"""Every kind of bad input is rejected with its reason; the decode path survives fuzzing."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeos_cloud.receiver.ingest import BatchOpener, Rejected
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_protocol.crypto import Epoch, Keyring, derive_epoch_key
from edgeos_protocol.wire import Header, encode_body, seal, seal_batch
from edgeos_testing.devsim import simple_batch

T0 = 1_700_000_000_000_000


def _sealed(key: bytes, device: str = "gw1", *, count: int = 1) -> list[bytes]:
    epoch = Epoch.new(Keyring.of(key), device)
    body = encode_body(simple_batch({"a": [1.0, 2.0]}, [T0, T0 + 1000], text={"s": ["x", "y"]}))
    return [seal_batch(epoch, body, T0)[1] for _ in range(count)]


def _reason(opener: BatchOpener, payload: bytes, device: str | None = "gw1") -> str:
    with pytest.raises(Rejected) as info:
        opener.open(payload, T0, device)
    return info.value.reason


def test_each_bad_input_has_its_reason(registry: DeviceRegistry) -> None:
    record = registry.add("gw1")
    other = registry.add("gw2")
    opener = BatchOpener(registry, max_payload_bytes=4096)
    good = _sealed(record.current_key)[0]
    assert opener.open(good, T0, "gw1").sample_count == 4

    assert _reason(opener, good + bytes(5000)) == "oversized"
    assert _reason(opener, good[:20]) == "truncated"
    assert _reason(opener, b"") == "truncated"
    assert _reason(opener, b"XXXX" + good[4:]) == "malformed"
    assert _reason(opener, good[:4] + bytes([9]) + good[5:]) == "unsupported_version"
    assert _reason(opener, good[:5] + bytes([77]) + good[6:]) == "unsupported_version"
    flipped = bytearray(good)
    flipped[-1] ^= 1
    assert _reason(opener, bytes(flipped)) == "forged"
    assert _reason(opener, good[:-3]) == "forged"  # cut inside the tag: authentication fails
    # A header naming another device than the (ACL-enforced) topic.
    assert _reason(opener, good, device="gw2") == "forged"
    # Sealed with gw2's key but claiming gw1: key id unknown for gw1.
    assert _reason(opener, _sealed(other.current_key, "gw1")[0]) == "wrong_key"
    assert _reason(opener, _sealed(b"k" * 32, "ghost")[0], device="ghost") == "unknown_device"
    registry.revoke("gw2")
    assert _reason(opener, _sealed(other.current_key, "gw2")[0], device="gw2") == "revoked"


def test_authenticated_garbage_body_is_malformed(registry: DeviceRegistry) -> None:
    record = registry.add("gw1")
    opener = BatchOpener(registry)
    epoch = Epoch.new(Keyring.of(record.current_key), "gw1")
    for body in (b"", b"not zstd", encode_body(simple_batch({"a": [1.0]}, [T0]))[:-4]):
        _, sealed = seal_batch(epoch, body, T0)
        assert _reason(opener, sealed) == "malformed"


def test_skip_lists_are_validated_and_merged(registry: DeviceRegistry) -> None:
    record = registry.add("gw1")
    opener = BatchOpener(registry)
    epoch = Epoch.new(Keyring.of(record.current_key), "gw1")
    old = epoch.epoch ^ 1

    def sealed(skip: object) -> bytes:
        batch = simple_batch({"a": [1.0]}, [T0])
        batch.meta["skip"] = skip
        return seal_batch(epoch, encode_body(batch), T0)[1]

    for _ in range(9):  # the batch under test is seq 10
        epoch.next_seq()
    got = opener.open(
        sealed([[old, 7, 9], [epoch.epoch, 4, 5], [old, 1, 6], [epoch.epoch, 2, 2]]), T0, "gw1"
    )
    assert got.seq == 10
    assert got.skips == sorted([(old, 1, 9), (epoch.epoch, 2, 2), (epoch.epoch, 4, 5)])
    for bad in (
        "nope",
        [[1, 2]],
        [[old, 0, 1]],  # sequence numbers start at 1
        [[old, 5, 4]],
        [[old, 1, True]],
        [[-1, 1, 1]],
        [[old, 1, 1 << 63]],
    ):
        assert _reason(opener, sealed(bad)) == "malformed", bad
    # Longer than limits.max_skip_ranges: over a limit (quarantined, kept to re-ingest).
    assert _reason(opener, sealed([[1, 1, 1]] * 70_000)) == "limit"
    # A batch cannot announce its own number (or a later one) as skipped.
    own = epoch.last_seq + 1
    assert _reason(opener, sealed([[epoch.epoch, 3, own]])) == "malformed"
    assert opener.open(sealed([[epoch.epoch, 3, own]]), T0, "gw1").skips == [(epoch.epoch, 3, own)]


# --------------------------------------------------------------------------- fuzzing

_KEY = bytes(range(32))
_FUZZ: dict[str, DeviceRegistry] = {}


def _fuzz_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[BatchOpener, bytes, Header]:
    if "registry" not in _FUZZ:
        _FUZZ["registry"] = DeviceRegistry(tmp_path_factory.mktemp("fuzzreg"))
        _FUZZ["registry"].add("fz", _KEY)
    epoch = Epoch.new(Keyring.of(_KEY), "fz")
    batch = simple_batch(
        {"a": [1.0, 2.5, 3.0], "b": [0.0, 1.0, 2.0]},
        [T0, T0 + 1, T0 + 2],
        text={"s": ["p", "q", "r"]},
        events=[{"type": "e", "ts_us": T0}],
    )
    header, sealed = seal_batch(epoch, encode_body(batch), T0)
    return BatchOpener(_FUZZ["registry"]), sealed, header


def _resealed(header: Header, body: bytes) -> bytes:
    """Seal an arbitrary body under the device key so it gets past authentication."""
    key = derive_epoch_key(
        _KEY,
        suite=header.suite,
        device=header.device,
        key_id=header.key_id,
        epoch=header.epoch,
        salt=header.salt,
    )
    return seal(header, body, key)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, val in edits:
        if buf:
            buf[pos % len(buf)] = val
    if cut is not None and buf:
        del buf[cut % len(buf) :]
    return bytes(buf)


def _check(opener: BatchOpener, payload: bytes) -> None:
    try:
        opener.open(payload, T0, "fz")
    except Rejected as exc:
        assert exc.reason in {
            "limit",
            "timestamp",
            "malformed",
            "truncated",
            "forged",
            "unsupported_version",
            "oversized",
            "wrong_key",
            "unknown_device",
        }


_EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


def _fuzz(tmp_path_factory: pytest.TempPathFactory, examples: int) -> None:
    opener, sealed, header = _fuzz_setup(tmp_path_factory)
    import zstandard

    from edgeos_protocol.wire import open_body

    _, body = open_body(
        sealed,
        derive_epoch_key(
            _KEY,
            suite=header.suite,
            device="fz",
            key_id=header.key_id,
            epoch=header.epoch,
            salt=header.salt,
        ),
    )
    raw = zstandard.ZstdDecompressor().decompress(body)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        target=st.sampled_from(["sealed", "body", "raw", "random"]),
        edits=_EDITS,
        cut=st.none() | st.integers(0, 1 << 20),
        noise=st.binary(max_size=256),
    )
    def run(target: str, edits: list[tuple[int, int]], cut: int | None, noise: bytes) -> None:
        if target == "sealed":  # framing and authentication
            _check(opener, _mutate(sealed, edits, cut))
        elif target == "body":  # authenticated, compressed body mutated
            _check(opener, _resealed(header, _mutate(body, edits, cut) + noise[:4]))
        elif target == "raw":  # authenticated, valid zstd, msgpack structure mutated
            mutated = _mutate(raw, edits, cut)
            _check(opener, _resealed(header, zstandard.ZstdCompressor().compress(mutated)))
        else:
            _check(opener, noise)
            _check(opener, sealed[:46] + noise)

    run()


def test_fuzz_decode_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    _fuzz(tmp_path_factory, 2500)


@pytest.mark.slow
def test_fuzz_decode_path_long(tmp_path_factory: pytest.TempPathFactory) -> None:
    _fuzz(tmp_path_factory, 100_000)


def test_oversized_declared_counts_are_bounded(registry: DeviceRegistry) -> None:
    """A tiny authenticated body declaring a huge decompressed size is refused, not inflated."""
    import zstandard

    record = registry.add("gw1")
    opener = BatchOpener(registry)
    epoch = Epoch.new(Keyring.of(record.current_key), "gw1")
    bomb = zstandard.ZstdCompressor().compress(bytes(100 << 20))
    _, sealed = seal_batch(epoch, bomb, T0)
    assert _reason(opener, sealed) == "limit"  # limits.max_body_bytes
    assert struct.calcsize(">Q") == 8


# --------------------------------------------------------------------------- structure-aware
#
# Hostile *shapes*, not junk: a valid body document (decoded from a real batch) with one or
# more of its parts replaced by msgpack values hypothesis builds — nested maps with bytes or
# int keys, huge or negative counts and widths, deep nesting, NUL and long strings, times far
# outside any window, skip lists naming many epochs — packed, compressed and sealed under the
# device's real key, so every case gets past authentication. Each case must end as a stored
# batch or a Quarantined/Rejected one, and a healthy device's batch stored in the same
# transactions as the fuzzed ones is never lost.

_ROOT_PATHS = [
    ("tags",),
    ("tags", "n"),
    ("tags", "idx"),
    ("tags", "pfx"),
    ("tags", "leaf"),
    ("tags", "li"),
    ("tags", "kind"),
    ("tags", "unit"),
    ("tags", "res"),
    ("str",),
    ("g",),
    ("g", 0),
    ("g", 0, "t"),
    ("g", 0, "c"),
    ("g", 0, "q"),
    ("g", 0, "n0"),
    ("g", 0, "nd"),
    ("g", 0, "sx"),
    ("g", 0, "s"),
    ("ev",),
    ("ev", 0),
    ("ev", 0, "ts_us"),
    ("ev", 0, "type"),
    ("meta",),
    ("meta", "skip"),
    ("meta", "x"),
]
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.sampled_from([0, 1, -1, 255, 256, 1 << 31, 1 << 53, (1 << 63) - 1, 1_000_000])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["\x00", "a\x00b", "x" * 2000, "é" * 300])
    | st.binary(max_size=24)
)
_KEYS = st.text(max_size=6) | st.binary(max_size=4) | st.sampled_from(["type", "ts_us", "skip"])
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=24,
)


def _hostile_value(kind: str, value: Any, n: int, epoch: int) -> Any:
    """A few shapes hypothesis would rarely find alone: deep nesting, wide ints, many epochs."""
    if kind == "deep":
        for _ in range(n % 300):
            value = {"k": value}
        return value
    if kind == "ints":  # an "ints" column with a hostile width / length
        return [n % 17, bytes(n % 64)]
    if kind == "skip":
        return [[(epoch + i) % (1 << 64), 1, 1 + n % 3] for i in range(n % 40)]
    if kind == "times":
        return [8, struct.pack("<q", (n * 7919) % (1 << 62) * (-1) ** n) * (1 + n % 3)]
    return value


def _put(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    node = doc
    for step in path[:-1]:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and node:
            node = node[step % len(node)]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int):
        if node:
            node[last % len(node)] = value
        else:
            node.append(value)


def _structured_fuzz(tmp_path_factory: pytest.TempPathFactory, examples: int) -> None:
    import copy

    import msgpack
    import zstandard

    from edgeos_cloud.receiver.ingest import Quarantined
    from edgeos_cloud.receiver.storage import open_storage

    registry = DeviceRegistry(tmp_path_factory.mktemp("structreg"))
    fuzz_key = registry.add("fz").current_key
    good_key = registry.add("good").current_key
    fz_epoch = Epoch.new(Keyring.of(fuzz_key), "fz")
    good_epoch = Epoch.new(Keyring.of(good_key), "good")
    base = simple_batch(
        {"a": [1.0, 2.5, 3.0], "b": [0.0, 1.0, 2.0]},
        [T0, T0 + 1, T0 + 2],
        text={"s": ["p", "q", "r"]},
        events=[{"type": "e", "ts_us": T0}],
    )
    base.meta = {"skip": [], "sim": True}
    doc0 = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(encode_body(base)))
    opener = BatchOpener(registry)
    storage = open_storage(
        f"sqlite:///{tmp_path_factory.mktemp('structdb') / 'r.db'}", sqlite_synchronous="normal"
    )
    outcomes: dict[str, int] = {}
    pending: list[Any] = []
    quarantined: list[Any] = []
    healthy_sent = 0

    def flush() -> None:
        nonlocal healthy_sent
        _, sealed = seal_batch(
            good_epoch, encode_body(simple_batch({"h": [float(healthy_sent)]}, [T0])), T0
        )
        healthy_sent += 1
        batches = [opener.open(sealed, T0, "good"), *pending]
        results = storage.store(batches, quarantined)
        assert results[0].stored and results[0].ack_seq == healthy_sent
        for r in results[1:]:
            outcomes["stored" if r.stored else r.quarantined or "replayed"] = (
                outcomes.get("stored" if r.stored else r.quarantined or "replayed", 0) + 1
            )
        pending.clear()
        quarantined.clear()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        edits=st.lists(
            st.tuples(
                st.sampled_from(_ROOT_PATHS),
                _VALUES,
                st.sampled_from(["plain", "plain", "deep", "ints", "skip", "times"]),
                st.integers(0, 1 << 16),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def run(edits: list[tuple[tuple[Any, ...], Any, str, int]]) -> None:
        doc = copy.deepcopy(doc0)
        for path, value, kind, n in edits:
            _put(doc, path, _hostile_value(kind, value, n, fz_epoch.epoch))
        try:
            raw = msgpack.packb(doc, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):  # not msgpack-able: nothing to send
            return
        _, sealed = seal_batch(fz_epoch, zstandard.ZstdCompressor().compress(raw), T0)
        try:
            pending.append(opener.open(sealed, T0, "fz"))
        except Quarantined as exc:
            quarantined.append(exc.record)
        except Rejected as exc:  # authenticated: only malformed shapes may end here
            raise AssertionError(f"authenticated batch rejected ({exc.reason}): {exc}") from None
        if len(pending) + len(quarantined) >= 7:
            flush()

    try:
        run()
        flush()
        summary = {s.device: s for s in storage.device_summaries()}
        assert summary["good"].batches == healthy_sent and summary["good"].backlog == 0
        assert sum(outcomes.values()) >= examples * 0.9, outcomes
    finally:
        storage.close()


# 2,000 cases: the same generator and assertions as the long run below, sized so that the
# default run stays short on a busy 2-core machine (5,000 took 428 s there with both cores
# loaded, against pytest's 120 s default timeout). The 1M-case run is `make test-slow`.
@pytest.mark.timeout(900)
def test_structured_fuzz_of_authenticated_batches(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _structured_fuzz(tmp_path_factory, 2000)


@pytest.mark.slow
def test_structured_fuzz_of_authenticated_batches_long(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _structured_fuzz(tmp_path_factory, 1_000_000)
