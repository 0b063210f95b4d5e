"""Regenerate the wire-format test vectors (run only when the format version changes).

    .venv/bin/python protocol/edgeos_protocol/vectors/make_vectors.py

Writes, next to this script: ``device_key.hex`` (the test device key), sealed batches
``v1_batch_<suite>.bin``, a sealed ack ``v1_ack.bin`` and ``v1_expected.json`` (headers and the
decoded content every reader must produce). Epoch ids and salts are fixed here so the vectors
are reproducible apart from zstd's and the control message's random salt; the test decodes the
checked-in bytes, it never re-encodes, so a reader change that breaks old batches is loud.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgeos_protocol.crypto import Epoch, Keyring, Suite
from edgeos_protocol.quality import Quality
from edgeos_protocol.wire import (
    MISSING,
    Batch,
    ControlKind,
    Group,
    TagTable,
    ValueKind,
    encode_body,
    seal_batch,
    seal_control,
)

HERE = Path(__file__).parent
KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
DEVICE = "gw-vector-1"
CREATED_US = 1_700_000_003_000_000


def vector_batch() -> Batch:
    table = TagTable(
        [0, 1, 2, 3, 7],
        ["nest01.temp", "nest01.press", "nest01.running", "nest01.recipe", "line.count"],
        [ValueKind.NUMBER, ValueKind.NUMBER, ValueKind.BOOL, ValueKind.STRING, ValueKind.NUMBER],
        [0.1, 0.01, 1.0, 1.0, 1.0],
        ["°C", "bar", "", "", ""],
    )
    nan = math.nan
    t0 = 1_700_000_000_000_000
    fast = Group(
        np.array([t0, t0 + 1_000_000, t0 + 2_000_000], np.int64),
        np.array([0, 1, 2, 3], np.int32),
        np.array([[180.04, 12.345, 1, nan], [180.26, nan, 0, nan], [nan, 12.3, 1, nan]]),
        np.array(
            [
                [Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.GOOD],
                [Quality.UNCERTAIN, Quality.BAD_COMM, Quality.GOOD, Quality.GOOD],
                [MISSING, Quality.STALE, Quality.BAD_DEVICE, Quality.GOOD],
            ],
            np.uint8,
        ),
        {(0, 3): "R-17", (1, 3): "R-17", (2, 3): "R-18 winter"},
    )
    slow = Group(
        np.array([t0 + 500_000], np.int64),
        np.array([4], np.int32),
        np.array([[math.inf]]),
        np.array([[Quality.GOOD]], np.uint8),
    )
    events = [
        {"type": "gate", "ts_us": t0 + 1_500_000, "station": "nest01", "verdict": "scrap"},
        {"type": "write", "ts_us": t0 + 1_600_000, "tag": "nest01.temp", "ok": True},
    ]
    return Batch(table, [fast, slow], events, {"fw": "0.1.0"})


def expected_content(batch: Batch) -> dict[str, Any]:
    """The decoded content as JSON (NaN → null, ±inf → "inf"/"-inf")."""

    def num(v: float) -> Any:
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v

    return {
        "tags": {
            "indices": batch.tag_indices.tolist(),
            "names": batch.tag_names,
            "kinds": batch.tag_kinds.tolist(),
            "resolutions": batch.tag_resolutions.tolist(),
            "units": batch.tag_units,
        },
        "groups": [
            {
                "times_us": g.times_us.tolist(),
                "tags": g.tags.tolist(),
                "values": [[num(v) for v in row] for row in g.values.tolist()],
                "quality": g.quality.tolist(),
                "text": [[r, c, s] for (r, c), s in sorted(g.text.items())],
            }
            for g in batch.groups
        ],
        "events": batch.events,
        "meta": batch.meta,
    }


def main() -> None:
    from edgeos_protocol.wire import decode_body

    ring = Keyring.of(KEY)
    (HERE / "device_key.hex").write_text(KEY.hex() + "\n")
    body = encode_body(vector_batch())
    expected: dict[str, Any] = {"device": DEVICE, "key_id": ring.current_id, "batches": {}}
    for i, suite in enumerate(Suite, start=1):
        epoch = Epoch(
            device_key=KEY,
            device=DEVICE,
            key_id=ring.current_id,
            suite=suite,
            epoch=0x0123456789ABCDEF + i,
            salt=bytes([i]) * 16,
        )
        epoch.last_seq = 41  # the next batch is seq 42
        header, sealed = seal_batch(epoch, body, CREATED_US)
        name = f"v1_batch_{suite.config_name}.bin"
        (HERE / name).write_bytes(sealed)
        expected["batches"][name] = {
            "suite": int(suite),
            "epoch": header.epoch,
            "salt": header.salt.hex(),
            "seq": header.seq,
            "created_us": header.created_us,
            "epoch_key": epoch.key.hex(),
        }
    ack = seal_control(
        ControlKind.ACK,
        {"epoch": 0x0123456789ABCDF0, "seq": 42},
        KEY,
        DEVICE,
        1_700_000_004_000_000,
        key_id=ring.current_id,
        created_us=CREATED_US,
    )
    (HERE / "v1_ack.bin").write_bytes(ack)
    expected["ack"] = {
        "kind": "ACK",
        "counter": 1_700_000_004_000_000,
        "payload": {"epoch": 0x0123456789ABCDF0, "seq": 42},
    }
    # The expected content is what decoding produces (quantized), not the input.
    expected["content"] = expected_content(decode_body(body))
    (HERE / "v1_expected.json").write_text(
        json.dumps(expected, indent=1, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
