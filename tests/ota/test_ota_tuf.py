"""End to end over HTTP: a real TUF repository, the ngclient-based client, and attacks on both."""

from __future__ import annotations

import io
import shutil
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
import zstandard
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from edgeos.ota.client import CheckResult
from edgeos_cloud.ota.repository import (
    Expiry,
    OtaRepository,
    RepoServer,
    RootKeysMissingError,
    serving,
)
from edgeos_protocol.bundle import read_manifest
from edgeos_protocol.outcome import Reason
from edgeos_testing.ota import (
    HARDWARE,
    Device,
    EndlessHandler,
    MakeRelease,
    TrickleHandler,
    forge_metadata,
)


def _check(device: Device, url: str, **settings: float) -> list[CheckResult]:
    return device.client(url, group="canary", **settings).check_and_install(device.slots)


def _assert_refused(device: Device, results: list[CheckResult], reason: Reason) -> None:
    refused = [r for r in results if r.status == "rejected"]
    assert refused, results
    assert refused[0].reason == reason.value, results
    state = device.slots.read_state()
    assert (state.active, state.trial, state.committed_version) == ("a", None, "1.0.0")
    assert not device.slots.slot_path("b").exists()
    assert state.last_failure is not None and state.last_failure.startswith(reason.value)
    assert device.slots.boot_check().version == "1.0.0"


def _attacker_key(tmp_path: Path) -> Path:
    signer = CryptoSigner.generate_ed25519()
    path = tmp_path / "attacker.pem"
    path.write_bytes(signer.private_bytes)
    return path


def test_update_is_found_installed_and_committed(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("1.1.0"), groups=["canary"])
    results = _check(device, server.url)
    assert results[0].status == "installed" and results[0].restart_required
    assert device.slots.boot_check().version == "1.1.0"
    device.slots.commit()
    assert _check(device, server.url)[0].status == "up_to_date"


def test_other_groups_and_hardware_see_nothing(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("1.1.0"), groups=["wave1"])
    repo.publish(make_release("1.2.0", hardware="jetson-orin"), groups=["canary"])
    assert [r.status for r in _check(device, server.url)] == ["none", "none", "none"]


def test_models_only_update_over_the_air(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    loaded: list[Path] = []
    device.slots.models_hook = loaded.append
    repo.publish(make_release("5", kind="models"), groups=["canary"])
    results = _check(device, server.url)
    assert results[-1].status == "installed" and not results[-1].restart_required
    assert loaded == [device.slots.models_dir / "5"]


def test_unsigned_timestamp_is_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("1.1.0"), groups=["canary"])
    forge_metadata(repo, "timestamp", key_files=[], version=repo.timestamp().version + 1)
    _assert_refused(device, _check(device, server.url), Reason.UNSIGNED)


def test_targets_signed_with_wrong_key_are_refused(
    repo: OtaRepository,
    server: RepoServer,
    device: Device,
    make_release: MakeRelease,
    tmp_path: Path,
) -> None:
    """The attacker owns the server (snapshot + timestamp keys) but not the targets key."""
    repo.publish(make_release("1.1.0"))  # published, not yet pointed at any group
    evil = repo.targets()
    path = next(iter(repo.published()))
    forge_metadata(
        repo,
        "targets",
        key_files=[_attacker_key(tmp_path)],
        version=evil.version + 1,
        mutate=lambda t: repo._point(t, "canary", HARDWARE, "full", path=path, version="1.1.0"),
    )
    repo.do_snapshot()
    repo.do_timestamp()
    _assert_refused(device, _check(device, server.url), Reason.UNSIGNED)


def test_bit_flipped_bundle_on_server_is_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("1.1.0"), groups=["canary"])
    served = next((repo.dir / "targets" / "bundles").rglob("*.tar.zst"))
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x40
    served.write_bytes(bytes(data))
    _assert_refused(device, _check(device, server.url), Reason.HASH_MISMATCH)


def test_replayed_old_metadata_is_a_rollback(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.publish(make_release("1.1.0"), groups=["wave1"])
    assert _check(device, server.url)[0].status == "none"  # device now trusts the newer timestamp
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    _assert_refused(device, _check(device, server.url), Reason.ROLLBACK)


def test_older_bundle_offered_is_a_rollback(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("0.9.0"), groups=["canary"])
    _assert_refused(device, _check(device, server.url), Reason.ROLLBACK)


def test_huge_bundle_version_is_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    """Signed by the real targets key (leaked key or release mistake): our sanity bound holds."""
    published = repo.publish(make_release("1.1.0"), groups=["canary"])

    def inflate(targets: object) -> None:
        info = targets.targets[published.target_path]  # type: ignore[attr-defined]
        info.unrecognized_fields["custom"]["edgeos"]["version"] = "4000000000"

    forge_metadata(repo, "targets", version=repo.targets().version + 1, mutate=inflate)
    repo.do_snapshot()
    repo.do_timestamp()
    _assert_refused(device, _check(device, server.url), Reason.FAST_FORWARD)


def test_fast_forwarded_timestamp_recovered_by_key_rotation(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    """TUF version rules: once a (stolen-key) timestamp v10^9 is trusted, honest lower versions
    are refused as rollbacks until the timestamp key is rotated via the offline root."""
    honest = (repo.metadata_dir / "timestamp.json").read_bytes()
    forge_metadata(repo, "timestamp", version=10**9)
    assert _check(device, server.url)[0].status == "none"  # accepted: validly signed
    (repo.metadata_dir / "timestamp.json").write_bytes(honest)
    repo.publish(make_release("1.1.0"), groups=["canary"])
    _assert_refused(device, _check(device, server.url), Reason.ROLLBACK)

    repo.rotate_key("timestamp")
    assert _check(device, server.url)[0].status == "installed"


def test_expired_metadata_is_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    """Freeze attack: the server keeps serving metadata past its expiry."""
    repo.publish(make_release("1.1.0"), groups=["canary"])
    repo.expiry = Expiry(timestamp=-60)
    repo.refresh_timestamp()
    _assert_refused(device, _check(device, server.url), Reason.EXPIRED)


@pytest.mark.parametrize("match", ["/targets/bundles/", "/metadata/timestamp.json"])
def test_endless_data_is_cut_off(
    repo: OtaRepository, device: Device, make_release: MakeRelease, match: str
) -> None:
    repo.publish(make_release("1.1.0"), groups=["canary"])
    handler = type("Endless", (EndlessHandler,), {"match": match})
    with RepoServer(repo.dir, handler=handler).start() as srv:
        results = _check(device, srv.url)
    _assert_refused(device, results, Reason.TOO_LONG)


def test_trickling_server_is_abandoned(
    repo: OtaRepository, device: Device, make_release: MakeRelease
) -> None:
    """Slow retrieval: one byte per 50 ms never trips a gap timeout, but the average does."""
    repo.publish(make_release("1.1.0"), groups=["canary"])
    with RepoServer(repo.dir, handler=TrickleHandler).start() as srv:
        results = _check(device, srv.url, min_speed_bps=1000, speed_grace_s=0.3, socket_timeout_s=5)
    _assert_refused(device, results, Reason.SLOW)


def test_mixed_metadata_versions_are_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("1.1.0"), groups=["wave1"])
    v_old = repo.targets().version
    repo.publish(make_release("1.2.0"), groups=["canary"])
    v_new = repo.targets().version
    shutil.copy(
        repo.metadata_dir / f"{v_old}.targets.json", repo.metadata_dir / f"{v_new}.targets.json"
    )
    _assert_refused(device, _check(device, server.url), Reason.MIX_AND_MATCH)


def test_bundle_mixing_two_releases_is_refused(
    repo: OtaRepository,
    server: RepoServer,
    device: Device,
    make_release: MakeRelease,
    tmp_path: Path,
) -> None:
    """Manifest of 1.2.0, payload of 1.1.0, published and signed: the file hashes catch it."""
    a, b = make_release("1.1.0"), make_release("1.2.0")

    def members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
        with bundle.open("rb") as raw:
            data = zstandard.ZstdDecompressor().stream_reader(raw).read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]

    mixed = tmp_path / "mixed" / b.name
    mixed.parent.mkdir()
    with tarfile.open(mixed, "w") as out:
        for m, data in members(b)[:1] + members(a)[1:]:
            out.addfile(m, io.BytesIO(data))
    assert read_manifest(mixed).version == "1.2.0"
    repo.publish(mixed, groups=["canary"], verify=False)
    results = _check(device, server.url)
    _assert_refused(device, results, Reason.HASH_MISMATCH)


def test_channel_pointing_at_other_hardware_is_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    jetson = repo.publish(make_release("1.1.0", hardware="jetson-orin"))
    with repo.edit_targets() as targets:
        repo._point(targets, "canary", HARDWARE, "full", path=jetson.target_path, version="1.1.0")
    repo.do_snapshot()
    repo.do_timestamp()
    _assert_refused(device, _check(device, server.url), Reason.WRONG_HARDWARE)


def test_rotated_keys_are_followed(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    assert _check(device, server.url)[0].status == "none"
    repo.rotate_key("root")
    repo.rotate_key("targets")
    repo.rotate_key("snapshot")
    repo.publish(make_release("1.1.0"), groups=["canary"])
    # The device still holds root v1 from provisioning and walks the signed chain.
    assert _check(device, server.url)[0].status == "installed"
    history = sorted(p.name for p in (device.root / "tuf" / "metadata" / "root_history").iterdir())
    assert history == ["1.root.json", "2.root.json", "3.root.json", "4.root.json"]


def test_revoked_key_is_refused(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    old_key = next(repo.keys_dir / f"{k}.pem" for k in repo.root().roles["targets"].keyids)
    stolen = old_key.read_bytes()
    new_id = repo.rotate_key("targets")
    assert (repo.keys_dir / "revoked" / old_key.name).exists()
    assert repo.root().roles["targets"].keyids == [new_id]
    published = repo.publish(make_release("1.1.0"))
    old_key.write_bytes(stolen)  # the thief still has it
    forge_metadata(
        repo,
        "targets",
        key_files=[old_key],
        version=repo.targets().version + 1,
        mutate=lambda t: repo._point(
            t, "canary", HARDWARE, "full", path=published.target_path, version="1.1.0"
        ),
    )
    repo.do_snapshot()
    repo.do_timestamp()
    _assert_refused(device, _check(device, server.url), Reason.UNSIGNED)


def test_root_keys_stay_offline(
    repo: OtaRepository, make_release: MakeRelease, tmp_path: Path
) -> None:
    online = OtaRepository(repo.dir)  # no root keys given
    assert not list(repo.dir.rglob(f"{repo.root().roles['root'].keyids[0]}.pem"))
    online.publish(make_release("1.1.0"), groups=["canary"])
    online.refresh_timestamp()
    with pytest.raises(RootKeysMissingError):
        online.rotate_key("targets")


def test_root_threshold_two_needs_both_keys(tmp_path: Path) -> None:
    keys = tmp_path / "root-keys"
    repo = OtaRepository.init(tmp_path / "r", keys, root_keys=2, root_threshold=2)
    assert repo.root().roles["root"].threshold == 2
    sorted(keys.glob("*.pem"))[0].unlink()
    with pytest.raises(RootKeysMissingError):
        repo.rotate_key("timestamp")


def test_serve_only_exposes_metadata_and_targets(repo: OtaRepository) -> None:
    import urllib.error
    import urllib.request

    with serving(repo.dir) as srv:
        assert urllib.request.urlopen(f"{srv.url}/metadata/1.root.json").status == 200
        for path in ("/keys/", "/repo.json", "/metadata/../keys", "/targets/../../etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(srv.url + path)
            assert info.value.code == 404


def test_short_timestamp_expiry_is_configurable(tmp_path: Path) -> None:
    repo = OtaRepository.init(tmp_path / "r", tmp_path / "k", expiry=Expiry(timestamp=3600))
    left = repo.timestamp().expires - repo.root().expires
    assert left < timedelta(days=-300)
    assert OtaRepository(tmp_path / "r").expiry.timestamp == 3600


def test_release_that_failed_its_trial_is_skipped_not_retried(
    repo: OtaRepository, server: RepoServer, device: Device, make_release: MakeRelease
) -> None:
    repo.publish(make_release("1.1.0", behaviour="crash"), groups=["canary"])
    assert _check(device, server.url)[0].status == "installed"
    for _ in range(device.slots.max_attempts + 1):
        decision = device.slots.boot_check()
    assert decision.version == "1.0.0"
    outcome = device.slots.read_state().last_outcome
    result = _check(device, server.url)[0]
    assert (result.status, result.reason) == ("skipped", "previously_failed")
    assert device.slots.read_state().last_outcome == outcome  # the rollback report stands
