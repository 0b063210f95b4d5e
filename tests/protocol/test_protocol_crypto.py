"""Device keys, epoch derivation, rotation and the no-nonce-reuse argument."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeos.errors import AuthenticationFailed, ProvisioningError
from edgeos_protocol.crypto import (
    Epoch,
    EpochKeyCache,
    Keyring,
    Suite,
    derive_epoch_key,
    key_id_for,
    load_device_key,
    nonce_for,
    write_device_key,
)
from edgeos_protocol.wire import (
    ControlKind,
    epoch_key_for,
    open_control,
    parse_header,
    seal_batch,
    seal_control,
)


def test_key_file_must_be_private_and_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    with pytest.raises(ProvisioningError, match="does not exist"):
        load_device_key(path)
    key = write_device_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_device_key(path) == key
    path.chmod(0o640)
    with pytest.raises(ProvisioningError, match=f"chmod 600 {path}"):
        load_device_key(path)
    path.chmod(0o604)
    with pytest.raises(ProvisioningError, match="0604"):
        load_device_key(path)
    path.chmod(0o600)
    path.write_bytes(key + b"\n")
    with pytest.raises(ProvisioningError, match="exactly 32"):
        load_device_key(path)
    path.write_bytes(key[:16])
    with pytest.raises(ProvisioningError, match="holds 16 bytes"):
        load_device_key(path)
    with pytest.raises(FileExistsError):
        write_device_key(path)  # never overwrites a provisioned key
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(ProvisioningError, match="regular file"):
        load_device_key(tmp_path / "dir.key")


def test_epoch_key_is_bound_to_every_input() -> None:
    key, salt = bytes(32), bytes(16)
    base = {
        "suite": Suite.CHACHA20_POLY1305,
        "device": "gw-1",
        "key_id": 1,
        "epoch": 2,
        "salt": salt,
    }
    ref = derive_epoch_key(key, **base)  # type: ignore[arg-type]
    variants = [
        {"suite": Suite.AES_256_GCM},
        {"device": "gw-2"},
        {"key_id": 2},
        {"epoch": 3},
        {"salt": b"\x01" * 16},
    ]
    keys = {derive_epoch_key(key, **{**base, **v}) for v in variants}  # type: ignore[arg-type, dict-item]
    assert ref not in keys and len(keys) == len(variants)
    assert derive_epoch_key(b"\x01" * 32, **base) != ref  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="salt"):
        derive_epoch_key(key, **{**base, "salt": b"short"})  # type: ignore[arg-type]


def test_epoch_sequence_starts_at_one_and_exhausts() -> None:
    epoch = Epoch.new(Keyring.of(bytes(32)), "gw-1", max_seq=3)
    assert [epoch.next_seq() for _ in range(3)] == [1, 2, 3]
    assert epoch.exhausted
    with pytest.raises(OverflowError):
        epoch.next_seq()


def _sealed_nonces(state: Path, batches: int) -> set[tuple[bytes, bytes]]:
    """Start a 'device' from a state dir: seal batches, return its (key, nonce) pairs."""
    ring = Keyring.load(state / "device.key")
    epoch = Epoch.new(ring, "gw-1")
    pairs = set()
    for i in range(batches):
        header, sealed = seal_batch(epoch, b"body %d" % i, i)
        key = epoch_key_for(parse_header(sealed), ring.current)
        assert key == epoch.key
        pairs.add((key, nonce_for(header.seq)))
    return pairs


def test_no_key_nonce_pair_repeats_across_restarts_restores_and_clones(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    write_device_key(state / "device.key")
    backup = tmp_path / "backup"
    shutil.copytree(state, backup)
    clone = tmp_path / "clone"  # the same SD card image in a second gateway
    shutil.copytree(state, clone)

    seen: set[tuple[bytes, bytes]] = set()
    total = 0
    for directory in (state, state, backup, clone, backup, clone):  # restarts + restores
        pairs = _sealed_nonces(directory, 50)
        total += len(pairs)
        assert not (seen & pairs), "a (key, nonce) pair was reused"
        seen |= pairs
    assert len(seen) == total == 300

    # Two instances started from the same state at the same time derive different keys.
    a = Epoch.new(Keyring.load(state / "device.key"), "gw-1")
    b = Epoch.new(Keyring.load(clone / "device.key"), "gw-1")
    assert a.key != b.key and a.salt != b.salt and a.epoch != b.epoch


def test_rotation_by_key_id(tmp_path: Path) -> None:
    old_path, new_path = tmp_path / "old.key", tmp_path / "new.key"
    old, new = write_device_key(old_path), write_device_key(new_path)
    ring = Keyring.load(new_path, retired=[old_path])
    assert ring.current == new and ring.current_id == key_id_for(new)
    assert set(ring.keys) == {key_id_for(old), key_id_for(new)}
    # An ack sealed by a receiver still using the old key opens until it is retired.
    ack = seal_control(
        ControlKind.ACK, {"epoch": 1, "seq": 1}, old, "gw-1", 1, key_id=key_id_for(old)
    )
    assert open_control(ack, ring.keys).payload == {"epoch": 1, "seq": 1}
    epoch = Epoch.new(ring, "gw-1")
    header, _ = seal_batch(epoch, b"x", 1)
    assert header.key_id == key_id_for(new)
    with pytest.raises(ValueError, match="current"):
        ring.retire(ring.current_id)
    ring.retire(key_id_for(old))
    with pytest.raises(AuthenticationFailed, match="unknown key"):
        open_control(ack, ring.keys)
    old_path.chmod(0o644)
    with pytest.raises(ProvisioningError, match="chmod 600"):
        Keyring.load(new_path, retired=[old_path])  # retired keys are checked too


def test_epoch_key_cache_matches_derivation() -> None:
    cache = EpochKeyCache(maxsize=2)
    args = {"suite": Suite.CHACHA20_POLY1305, "device": "gw-1", "key_id": 1, "salt": bytes(16)}
    keys = [cache.get(bytes(32), epoch=e, **args) for e in (1, 2, 3, 1)]  # type: ignore[arg-type]
    assert keys[0] == keys[3] == derive_epoch_key(bytes(32), epoch=1, **args)  # type: ignore[arg-type]
    assert len(set(keys)) == 3
    assert Suite.from_name("aes-256-gcm") is Suite.AES_256_GCM
    assert Suite.AES_256_GCM.config_name == "aes-256-gcm"
    with pytest.raises(ValueError, match="unknown cipher"):
        Suite.from_name("rot13")
