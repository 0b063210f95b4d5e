"""Checked-in wire vectors decode to the checked-in content: a format change is loud."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

import edgeos_protocol
from edgeos.errors import AuthenticationFailed
from edgeos_protocol.crypto import Keyring, Suite
from edgeos_protocol.wire import (
    DOWNLINK_KINDS,
    ControlKind,
    epoch_key_for,
    open_control,
    open_sealed,
    parse_header,
)

VECTORS = Path(edgeos_protocol.__file__).parent / "vectors"
EXPECTED: dict[str, Any] = json.loads((VECTORS / "v1_expected.json").read_text())
KEY = bytes.fromhex((VECTORS / "device_key.hex").read_text().strip())


def _make_vectors_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(EXPECTED["batches"]))
def test_sealed_vector_decodes_to_expected_content(name: str) -> None:
    want = EXPECTED["batches"][name]
    sealed = (VECTORS / name).read_bytes()
    header = parse_header(sealed)
    assert header.device == EXPECTED["device"] and header.key_id == EXPECTED["key_id"]
    assert (int(header.suite), header.epoch, header.salt.hex(), header.seq, header.created_us) == (
        want["suite"],
        want["epoch"],
        want["salt"],
        want["seq"],
        want["created_us"],
    )
    key = epoch_key_for(header, Keyring.of(KEY).keys[header.key_id])
    assert key.hex() == want["epoch_key"]  # HKDF inputs and order are part of the format
    _, batch = open_sealed(sealed, key)
    content = _make_vectors_module().expected_content(batch)
    assert json.loads(json.dumps(content, ensure_ascii=False)) == EXPECTED["content"]


def test_vector_content_matches_the_generator_input_semantics() -> None:
    """The expected JSON is what the spec says the input decodes to (not just a snapshot)."""
    groups = EXPECTED["content"]["groups"]
    assert groups[0]["values"][0][:2] == [180.0, 12.34]  # quantized to 0.1 / 0.01
    assert groups[0]["values"][1][1] is None  # BAD_COMM: no value
    assert groups[0]["quality"][2][0] == 255  # MISSING
    assert groups[0]["values"][2][2] is None  # BAD_DEVICE bool
    assert groups[0]["text"] == [[0, 3, "R-17"], [1, 3, "R-17"], [2, 3, "R-18 winter"]]
    assert groups[1]["values"] == [["inf"]]  # a special travels exactly


def test_ack_vector_opens() -> None:
    ack = (VECTORS / "v1_ack.bin").read_bytes()
    control = open_control(
        ack, Keyring.of(KEY).keys, device=EXPECTED["device"], kinds=DOWNLINK_KINDS
    )
    assert control.kind is ControlKind[EXPECTED["ack"]["kind"]]
    assert control.counter == EXPECTED["ack"]["counter"]
    assert control.payload == EXPECTED["ack"]["payload"]
    with pytest.raises(AuthenticationFailed):
        open_control(ack, {control.key_id: bytes(32)})


def test_both_suites_have_a_vector() -> None:
    assert {v["suite"] for v in EXPECTED["batches"].values()} == {int(s) for s in Suite}
