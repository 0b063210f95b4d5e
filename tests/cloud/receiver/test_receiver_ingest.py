"""Every kind of bad input is rejected with its reason; the decode path survives fuzzing."""

from __future__ import annotations

import struct

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
        [[1, 1, 1]] * 70_000,
    ):
        assert _reason(opener, sealed(bad)) == "malformed", bad
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
    assert _reason(opener, sealed) == "malformed"
    assert struct.calcsize(">Q") == 8
