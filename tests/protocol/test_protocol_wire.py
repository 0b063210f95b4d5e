"""Wire format v1: round trips, quantization, refusals, tampering, limits, control messages."""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeos.driver import Quality
from edgeos.errors import AuthenticationFailed, MalformedBatch, UnsupportedVersion
from edgeos_protocol import wire
from edgeos_protocol.crypto import Epoch, EpochKeyCache, Keyring, Suite, key_id_for
from edgeos_protocol.wire import (
    MISSING,
    Batch,
    ControlKind,
    Group,
    Header,
    ReplayGuard,
    TagTable,
    ValueKind,
    decode_body,
    encode_body,
    epoch_key_for,
    open_control,
    open_sealed,
    parse_header,
    seal,
    seal_batch,
    seal_control,
)

KEY = bytes(range(32))
RING = Keyring.of(KEY)
QUALITIES = [int(q) for q in Quality] + [MISSING]


def _epoch(suite: Suite = Suite.CHACHA20_POLY1305) -> Epoch:
    return Epoch.new(RING, "gw-1", suite)


def _mixed_batch() -> Batch:
    table = TagTable(
        [3, 4, 10, 11, 12],
        ["nest01.temp", "nest01.running", "nest01.recipe", "pressure", "nest02.temp"],
        [ValueKind.NUMBER, ValueKind.BOOL, ValueKind.STRING, ValueKind.NUMBER, ValueKind.NUMBER],
        [0.1, 1.0, 1.0, 0.01, 0.1],
        ["°C", "", "", "bar", "°C"],
    )
    nan = math.nan
    values = np.array(
        [
            [180.04, 1.0, nan, 5.123, 179.9],
            [180.16, 0.0, nan, nan, math.inf],
            [nan, 1.0, nan, 5.2, 1e300],
        ]
    )
    quality = np.array(
        [
            [Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN, Quality.GOOD],
            [Quality.STALE, Quality.GOOD, Quality.BAD_DECODE, Quality.BAD_COMM, Quality.GOOD],
            [MISSING, Quality.BAD_DEVICE, Quality.GOOD, Quality.GOOD, Quality.GOOD],
        ],
        np.uint8,
    )
    group = Group(
        np.array([1_700_000_000_000_000, 1_700_000_001_000_000, 1_700_000_002_000_500]),
        np.arange(5, dtype=np.int32),
        values,
        quality,
        {(0, 2): "R-17 winter", (2, 2): "R-18 ✓"},
    )
    slow = Group(
        np.array([1_700_000_000_500_000]),
        np.array([3], np.int32),
        np.array([[5.0]]),
        np.array([[0]], np.uint8),
    )
    events = [{"type": "gate", "ts_us": 1, "station": "nest01", "verdict": "scrap"}]
    return Batch(table, [group, slow], events, {"fw": "0.1.0", "dropped": 0})


def test_every_value_kind_round_trips_with_bad_and_missing_explicit() -> None:
    batch = _mixed_batch()
    got = decode_body(encode_body(batch))
    assert got.tag_names == batch.tag_names
    assert got.tag_units == batch.tag_units
    assert got.tag_indices.tolist() == [3, 4, 10, 11, 12]
    assert got.tag_kinds.tolist() == batch.tag_kinds.tolist()
    assert got.tag_resolutions.tolist() == batch.tag_resolutions.tolist()
    assert got.events == batch.events and got.meta == batch.meta
    g = got.groups[0]
    np.testing.assert_array_equal(g.quality, batch.groups[0].quality)
    np.testing.assert_array_equal(g.times_us, batch.groups[0].times_us)
    assert g.values[0, 0] == pytest.approx(180.0)  # quantized to 0.1
    assert g.values[1, 0] == pytest.approx(180.2)  # STALE is usable
    assert math.isnan(g.values[2, 0])  # missing
    assert g.values[:, 1].tolist()[:2] == [1.0, 0.0] and math.isnan(g.values[2, 1])
    assert g.values[0, 3] == pytest.approx(5.12) and math.isnan(g.values[1, 3])
    assert g.values[1, 4] == math.inf and g.values[2, 4] == 1e300  # specials travel exactly
    assert g.text == {(0, 2): "R-17 winter", (2, 2): "R-18 ✓"}
    assert np.isnan(g.values[:, 2]).all()
    assert got.sample_count == 15 - 1 + 1


def test_rows_flatten_present_samples_for_the_receiver() -> None:
    batch = decode_body(encode_body(_mixed_batch()))
    rows = batch.rows()
    assert len(rows) == batch.sample_count
    assert MISSING not in rows.quality.tolist()
    names = [batch.tag_names[t] for t in rows.tag.tolist()]
    assert names[:5] == batch.tag_names
    assert rows.ts_us[0] == 1_700_000_000_000_000
    texts = {names[i]: s for i, s in rows.text.items()}
    assert sorted(rows.text.values()) == ["R-17 winter", "R-18 ✓"]
    assert set(texts) == {"nest01.recipe"}
    # The last row is the second group's single sample.
    assert names[-1] == "pressure" and rows.value[-1] == 5.0


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    n_tags = draw(st.integers(1, 12))
    kinds = draw(st.lists(st.sampled_from(list(ValueKind)), min_size=n_tags, max_size=n_tags))
    res = draw(
        st.lists(
            st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0, 10.0]), min_size=n_tags, max_size=n_tags
        )
    )
    names = [f"{draw(st.sampled_from(['', 'a', 'nest01', 'x.y']))}.t{i}" for i in range(n_tags)]
    names = [n.lstrip(".") for n in names]
    indices = sorted(draw(st.sets(st.integers(0, 70_000), min_size=n_tags, max_size=n_tags)))
    table = TagTable(
        indices,
        names,
        kinds,
        res,
        [draw(st.sampled_from(["", "°C", "bar"])) for _ in range(n_tags)],
    )
    groups = []
    for _ in range(draw(st.integers(0, 3))):
        cols = draw(st.lists(st.integers(0, n_tags - 1), min_size=1, max_size=n_tags, unique=True))
        n_rows = draw(st.integers(0, 5))
        shape = (n_rows, len(cols))
        floats = st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from(
            [math.nan, math.inf, -math.inf, 1e200, 0.0, -0.0]
        )
        vals = np.array(
            draw(st.lists(floats, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
        ).reshape(shape)
        qual = np.array(
            draw(st.lists(st.sampled_from(QUALITIES), min_size=vals.size, max_size=vals.size)),
            np.uint8,
        ).reshape(shape)
        times = np.array(
            draw(st.lists(st.integers(0, 2**62), min_size=n_rows, max_size=n_rows)), np.int64
        )
        text = {
            (r, c): draw(st.text(max_size=8))
            for r in range(n_rows)
            for c in range(len(cols))
            if kinds[cols[c]] == ValueKind.STRING and qual[r, c] < Quality.BAD
        }
        groups.append(Group(times, np.array(cols, np.int32), vals, qual, text))
    return Batch(table, groups, [{"type": "alarm", "ts_us": 5}], {"k": [1, 2]})


def test_epoch_key_for_with_a_cache_derives_the_same_key_once() -> None:
    epoch = _epoch()
    _, sealed = seal_batch(epoch, encode_body(_mixed_batch()), 42)
    header = parse_header(sealed)
    cache = EpochKeyCache()
    first = epoch_key_for(header, KEY, cache=cache)
    assert first == epoch_key_for(header, KEY) == epoch.key
    assert epoch_key_for(header, bytes(32), cache=cache) == first  # served from the cache


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_round_trip_property(batch: Batch) -> None:
    epoch = _epoch()
    header, sealed = seal_batch(epoch, encode_body(batch), 42)
    got_header, got = open_sealed(sealed, epoch_key_for(parse_header(sealed), KEY))
    assert got_header == header
    assert got.tag_names == batch.tag_names
    assert got.tag_indices.tolist() == batch.tag_indices.tolist()
    for g_in, g_out in zip(batch.groups, got.groups, strict=True):
        np.testing.assert_array_equal(g_out.quality, g_in.quality)
        np.testing.assert_array_equal(g_out.times_us, g_in.times_us)
        np.testing.assert_array_equal(g_out.tags, g_in.tags)
        usable = g_in.quality < Quality.BAD
        for (r, c), v_in in np.ndenumerate(g_in.values):
            kind = batch.tag_kinds[g_in.tags[c]]
            v_out = g_out.values[r, c]
            if not usable[r, c] or kind == ValueKind.STRING:
                assert math.isnan(v_out)
            elif kind == ValueKind.BOOL:
                assert v_out == float(v_in != 0 and not math.isnan(v_in))
            elif not math.isfinite(v_in):
                assert v_out == v_in or (math.isnan(v_in) and math.isnan(v_out))
            else:
                res = batch.tag_resolutions[g_in.tags[c]]
                # Quantization error ≤ resolution / 2 (plus float rounding of large values).
                assert abs(v_out - v_in) <= res / 2 + 1e-9 * max(1.0, abs(v_in))
        assert g_out.text == g_in.text


@settings(max_examples=60, deadline=None)
@given(st.floats(-30000, 30000), st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.25, 1.0, 2.0]))
def test_quantization_within_resolution(value: float, resolution: float) -> None:
    table = TagTable([0], ["v"], [ValueKind.NUMBER], [resolution], [""])
    batch = Batch(
        table,
        [
            Group(
                np.array([0]),
                np.array([0], np.int32),
                np.array([[value]]),
                np.zeros((1, 1), np.uint8),
            )
        ],
    )
    out = decode_body(encode_body(batch)).groups[0].values[0, 0]
    assert abs(out - value) <= resolution / 2 + 1e-9


@pytest.mark.parametrize("suite", list(Suite))
def test_seal_open_both_suites_and_wrong_key_fails(suite: Suite) -> None:
    epoch = _epoch(suite)
    body = encode_body(_mixed_batch())
    header, sealed = seal_batch(epoch, body, 7)
    assert header.seq == 1 and header.suite is suite and header.key_id == key_id_for(KEY)
    assert parse_header(sealed) == header
    # The sealed message starts with the documented layout, written out field by field from the
    # epoch (docs/wire-format.md), not from Header.pack(): magic, version 1, suite, flags 0,
    # device length, key id, epoch, salt, seq, created, device.
    assert sealed[: header.size] == (
        b"EOSB"
        + bytes([1, int(suite), 0, len(b"gw-1")])
        + key_id_for(KEY).to_bytes(4, "big")
        + epoch.epoch.to_bytes(8, "big")
        + epoch.salt
        + (1).to_bytes(8, "big")
        + (7).to_bytes(8, "big")
        + b"gw-1"
    )
    # seal() with that header (what tools re-sealing a batch use) gives the same bytes: the
    # nonce comes from the sequence number alone.
    assert seal(header, body, epoch.key) == sealed
    with pytest.raises(AuthenticationFailed):
        open_sealed(sealed, bytes(32))
    other_suite = Suite.AES_256_GCM if suite is Suite.CHACHA20_POLY1305 else Suite.CHACHA20_POLY1305
    with pytest.raises(AuthenticationFailed):
        # Same device key, other suite: a different key (the suite is bound into HKDF info).
        open_sealed(
            sealed,
            Epoch(
                device_key=KEY,
                device="gw-1",
                key_id=header.key_id,
                suite=other_suite,
                epoch=header.epoch,
                salt=header.salt,
            ).key,
        )


def test_every_tampered_byte_is_refused() -> None:
    epoch = _epoch()
    _, sealed = seal_batch(epoch, encode_body(_mixed_batch()), 7)
    for pos in range(len(sealed)):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises((AuthenticationFailed, MalformedBatch, UnsupportedVersion)):
            open_sealed(bytes(bad), epoch.key)


def _resealed_header(sealed: bytes, offset: int, value: int) -> bytes:
    bad = bytearray(sealed)
    bad[offset] = value
    return bytes(bad)


def test_unknown_version_suite_flags_and_magic_are_refused_never_guessed() -> None:
    _, sealed = seal_batch(_epoch(), b"x", 1)
    with pytest.raises(UnsupportedVersion, match="version 2"):
        parse_header(_resealed_header(sealed, 4, 2))
    with pytest.raises(UnsupportedVersion, match="suite id 9"):
        parse_header(_resealed_header(sealed, 5, 9))
    with pytest.raises(UnsupportedVersion, match="flags"):
        parse_header(_resealed_header(sealed, 6, 1))
    with pytest.raises(MalformedBatch, match="magic"):
        parse_header(b"XXXX" + sealed[4:])
    with pytest.raises(MalformedBatch, match="shorter"):
        parse_header(sealed[:20])
    with pytest.raises(MalformedBatch, match="ciphertext"):
        parse_header(sealed[:57])
    with pytest.raises(MalformedBatch, match="exceeds"):
        parse_header(sealed + bytes(wire.MAX_SEALED_BYTES))


def test_sequence_zero_and_bad_device_are_malformed() -> None:
    _, sealed = seal_batch(_epoch(), b"x", 1)
    zero_seq = sealed[:36] + struct.pack(">Q", 0) + sealed[44:]
    with pytest.raises(MalformedBatch, match="sequence"):
        parse_header(zero_seq)
    with pytest.raises(MalformedBatch, match="device"):
        parse_header(sealed[:52] + b"!" + sealed[53:])


def _seal_raw_body(body: bytes) -> tuple[bytes, bytes]:
    epoch = _epoch()
    _, sealed = seal_batch(epoch, body, 1)
    return sealed, epoch.key


def test_decompression_bomb_is_refused_with_and_without_declared_size() -> None:
    big = bytes(wire.MAX_BODY_BYTES + 10)
    declared = zstandard.ZstdCompressor(level=1).compress(big)
    sealed, key = _seal_raw_body(declared)
    with pytest.raises(MalformedBatch, match="declares"):
        open_sealed(sealed, key)
    undeclared = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(big)
    sealed, key = _seal_raw_body(undeclared)
    with pytest.raises(MalformedBatch, match="past"):
        open_sealed(sealed, key)


@pytest.mark.parametrize(
    "body",
    [
        b"not zstd at all",
        zstandard.ZstdCompressor().compress(b"\xc1\xc1 not msgpack"),
        zstandard.ZstdCompressor().compress(msgpack.packb([1, 2, 3])),
        zstandard.ZstdCompressor().compress(msgpack.packb({"tags": {"n": 1}})),
        zstandard.ZstdCompressor().compress(msgpack.packb({"tags": {"n": 10**9}})),
    ],
)
def test_authentic_but_malformed_body_is_malformed(body: bytes) -> None:
    sealed, key = _seal_raw_body(body)
    with pytest.raises(MalformedBatch):
        open_sealed(sealed, key)


def test_body_with_lying_lengths_is_malformed() -> None:
    raw = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(encode_body(_mixed_batch())))
    raw["g"][0]["q"] = raw["g"][0]["q"][:-1]
    sealed, key = _seal_raw_body(zstandard.ZstdCompressor().compress(msgpack.packb(raw)))
    with pytest.raises(MalformedBatch, match="quality"):
        open_sealed(sealed, key)
    raw = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(encode_body(_mixed_batch())))
    raw["g"][0]["c"] = [1, bytes([0, 1, 1, 1, 50])]  # column 53 does not exist
    sealed, key = _seal_raw_body(zstandard.ZstdCompressor().compress(msgpack.packb(raw)))
    with pytest.raises(MalformedBatch, match="outside"):
        open_sealed(sealed, key)


def test_encoder_refuses_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="differ"):
        TagTable([0, 1], ["a"], [0, 0], [1.0, 1.0], ["", ""])
    with pytest.raises(ValueError, match="resolution"):
        TagTable([0], ["a"], [ValueKind.NUMBER], [0.0], [""])
    table = TagTable([0], ["a"], [ValueKind.NUMBER], [1.0], [""])
    bad = Group(np.array([0]), np.array([3], np.int32), np.zeros((1, 1)), np.zeros((1, 1), "u1"))
    with pytest.raises(ValueError, match="outside"):
        encode_body(Batch(table, [bad]))


def test_header_layout_is_fixed() -> None:
    h = Header(1, Suite.AES_256_GCM, "gw-1", 0x01020304, 5, bytes(range(16)), 6, 7)
    assert h.pack() == (
        b"EOSB\x01\x02\x00\x04\x01\x02\x03\x04"
        + (5).to_bytes(8, "big")
        + bytes(range(16))
        + (6).to_bytes(8, "big")
        + (7).to_bytes(8, "big")
        + b"gw-1"
    )


# --------------------------------------------------------------------------- control


def test_control_round_trip_and_refusals() -> None:
    msg = seal_control(
        ControlKind.ACK,
        {"epoch": 5, "seq": 9},
        KEY,
        "gw-1",
        100,
        key_id=RING.current_id,
        created_us=3,
    )
    c = open_control(msg, RING.keys, device="gw-1", kinds=wire.DOWNLINK_KINDS)
    assert (c.kind, c.payload, c.counter, c.created_us) == (
        ControlKind.ACK,
        {"epoch": 5, "seq": 9},
        100,
        3,
    )
    assert wire.parse_control_header(msg) == (ControlKind.ACK, "gw-1", RING.current_id)
    with pytest.raises(AuthenticationFailed, match="device"):
        open_control(msg, RING.keys, device="gw-2")
    with pytest.raises(AuthenticationFailed, match="kind"):
        open_control(msg, RING.keys, kinds=wire.UPLINK_KINDS)
    with pytest.raises(AuthenticationFailed, match="unknown key"):
        open_control(msg, {})
    with pytest.raises(AuthenticationFailed):
        open_control(msg, lambda _kid: bytes(32))  # forged: right id, wrong key
    for pos in range(len(msg)):
        bad = bytearray(msg)
        bad[pos] ^= 0x80
        with pytest.raises((AuthenticationFailed, MalformedBatch, UnsupportedVersion)):
            open_control(bytes(bad), RING.keys)
    # The kind is bound into the key: relabelling an ACK as a COMMAND fails authentication.
    relabelled = bytearray(msg)
    relabelled[6] = ControlKind.COMMAND
    with pytest.raises(AuthenticationFailed):
        open_control(bytes(relabelled), RING.keys)


def test_control_messages_never_share_a_key_and_replays_are_refused() -> None:
    a = seal_control(ControlKind.ACK, {"epoch": 1, "seq": 1}, KEY, "gw-1", 1, key_id=1)
    b = seal_control(ControlKind.ACK, {"epoch": 1, "seq": 1}, KEY, "gw-1", 1, key_id=1)
    assert a[12:28] != b[12:28]  # fresh salt per message → fresh key, even for counter reuse
    guard = ReplayGuard()
    first = open_control(a, {1: KEY})
    assert guard.check(first)
    assert not guard.check(open_control(b, {1: KEY}))  # same counter: replay
    later = seal_control(ControlKind.ACK, {}, KEY, "gw-1", 2, key_id=1)
    assert guard.check(open_control(later, {1: KEY}))
    assert guard.last("gw-1", ControlKind.ACK) == 2
    assert wire.counter_from_time(10**20, 1.0) == 10**20 + 1
    assert wire.counter_from_time(0, 2.5) == 2_500_000


def test_ack_status_is_optional_and_old_acks_still_read() -> None:
    from edgeos_protocol.wire import Ack, AckStatus

    plain = Ack(7, 3)
    assert plain.payload() == {"epoch": 7, "seq": 3} and plain.status is AckStatus.STORED
    assert Ack.parse({"epoch": 7, "seq": 3}) == plain  # what every receiver sent before
    told = Ack(7, 5, (4, 5))
    doc = told.payload()
    assert doc == {"epoch": 7, "seq": 5, "status": "quarantined", "quarantined": [4, 5]}
    assert Ack.parse(doc) == told and told.status is AckStatus.QUARANTINED
    # An older reader takes only epoch/seq; a status this reader does not know is "stored".
    assert Ack.parse({**doc, "status": "future"}).quarantined == ()
    for bad in ({"epoch": 7}, {"epoch": 7, "seq": True}, {**doc, "quarantined": [0]}):
        with pytest.raises(MalformedBatch):
            Ack.parse(bad)
