"""Bundles: build, unpack, and every way a hostile archive is refused."""

from __future__ import annotations

import errno
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from edgeos.ota.install import verify_tree
from edgeos_protocol.bundle import (
    BundleSources,
    Manifest,
    build_bundle,
    extract_bundle,
    read_manifest,
)
from edgeos_protocol.outcome import InstallError, Reason, Rejected, Version
from edgeos_testing.ota import HARDWARE, MakeRelease


def _rewrite(bundle: Path, out: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """Copy a zstd bundle into a plain tar, letting ``edit(tar_out, member, data)`` change it."""
    with bundle.open("rb") as raw:
        data = zstandard.ZstdDecompressor().stream_reader(raw).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            f = src.extractfile(member) if member.isreg() else None
            edit(dst, member, f.read() if f is not None else None)
    return out


def _copy(dst: tarfile.TarFile, member: tarfile.TarInfo, content: bytes | None) -> None:
    dst.addfile(member, io.BytesIO(content) if content is not None else None)


def test_round_trip_verifies_every_file(make_release: MakeRelease, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    bundle = make_release("1.2.3")
    manifest = read_manifest(bundle)
    assert (manifest.kind, manifest.version, manifest.target) == ("full", "1.2.3", HARDWARE)
    assert manifest.entry == "otastub"
    paths = {f.path for f in manifest.files}
    assert {"otastub/__main__.py", "config/edgeos.toml", "models/scrap.tflite"} <= paths

    out = extract_bundle(bundle, tmp_path / "x", progress=lambda *a: calls.append(a))
    assert out == manifest
    assert verify_tree(tmp_path / "x") == (manifest, [])
    assert calls[-1][1] == calls[-1][2] == manifest.total_size


def test_plain_tar_and_reproducible_builds(tmp_path: Path) -> None:
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "__init__.py").write_text("x = 1\n")
    sources = BundleSources(packages=[src])
    created = Manifest.from_bytes(
        json.dumps(
            {"format": 1, "kind": "full", "version": "1", "target": "t", "files": []}
        ).encode()
    )
    assert created.files == ()
    from datetime import UTC, datetime

    when = datetime(2025, 1, 1, tzinfo=UTC)
    a = build_bundle("full", 7, "t", sources, tmp_path / "a", compress=False, created=when)
    b = build_bundle("full", 7, "t", sources, tmp_path / "b", compress=False, created=when)
    assert a.read_bytes() == b.read_bytes()
    assert tarfile.is_tarfile(a)
    assert read_manifest(a).version == "7"


def test_models_and_config_bundles_hold_only_their_part(make_release: MakeRelease) -> None:
    models = read_manifest(make_release("3", kind="models"))
    config = read_manifest(make_release("5", kind="config"))
    assert {f.path.split("/")[0] for f in models.files} == {"models"}
    assert {f.path.split("/")[0] for f in config.files} == {"config"}


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("payload/../../etc/passwd", "file", Reason.UNSAFE_ENTRY),
        ("/etc/passwd", "file", Reason.UNSAFE_ENTRY),
        ("payload/otastub/evil", "symlink", Reason.UNSAFE_ENTRY),
        ("payload/otastub/link", "hardlink", Reason.UNSAFE_ENTRY),
        ("payload/dev/sda", "chardev", Reason.UNSAFE_ENTRY),
        ("payload/otastub/fifo", "fifo", Reason.UNSAFE_ENTRY),
        ("payload/otastub/extra.py", "file", Reason.UNSAFE_ENTRY),
    ],
)
def test_hostile_members_are_refused(
    make_release: MakeRelease, tmp_path: Path, name: str, kind: str, reason: Reason
) -> None:
    def edit(dst: tarfile.TarFile, member: tarfile.TarInfo, content: bytes | None) -> None:
        _copy(dst, member, content)
        if member.name == "payload/otastub/__init__.py":
            evil = tarfile.TarInfo(name)
            if kind == "symlink":
                evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/shadow"
            elif kind == "hardlink":
                evil.type, evil.linkname = tarfile.LNKTYPE, "payload/otastub/__init__.py"
            elif kind == "chardev":
                evil.type, evil.devmajor, evil.devminor = tarfile.CHRTYPE, 8, 0
            elif kind == "fifo":
                evil.type = tarfile.FIFOTYPE
            body = b"owned" if kind == "file" else b""
            evil.size = len(body)
            dst.addfile(evil, io.BytesIO(body))

    bad = _rewrite(make_release("1.0.0"), tmp_path / "bad.tar", edit)
    with pytest.raises(Rejected) as info:
        extract_bundle(bad, tmp_path / "x")
    assert info.value.reason is reason
    assert not (tmp_path / "etc").exists()
    assert not Path("/tmp/owned").exists()


def test_bit_flipped_payload_is_refused(make_release: MakeRelease, tmp_path: Path) -> None:
    def edit(dst: tarfile.TarFile, member: tarfile.TarInfo, content: bytes | None) -> None:
        if member.name.endswith("blob07.bin"):
            assert content is not None
            content = bytes([content[0] ^ 0x01]) + content[1:]
        _copy(dst, member, content)

    bad = _rewrite(make_release("1.0.0"), tmp_path / "bad.tar", edit)
    with pytest.raises(Rejected) as info:
        extract_bundle(bad, tmp_path / "x")
    assert info.value.reason is Reason.HASH_MISMATCH
    assert "blob07" in info.value.detail


def test_missing_file_and_size_lie_are_refused(make_release: MakeRelease, tmp_path: Path) -> None:
    def drop(dst: tarfile.TarFile, member: tarfile.TarInfo, content: bytes | None) -> None:
        if not member.name.endswith("blob03.bin"):
            _copy(dst, member, content)

    with pytest.raises(Rejected) as info:
        extract_bundle(_rewrite(make_release("1.0.0"), tmp_path / "a.tar", drop), tmp_path / "x")
    assert info.value.reason is Reason.MIX_AND_MATCH

    def grow(dst: tarfile.TarFile, member: tarfile.TarInfo, content: bytes | None) -> None:
        if member.name.endswith("blob04.bin"):
            assert content is not None
            content += b"more bytes than signed"
            member.size = len(content)
        _copy(dst, member, content)

    with pytest.raises(Rejected) as info:
        extract_bundle(_rewrite(make_release("1.0.0"), tmp_path / "b.tar", grow), tmp_path / "y")
    assert info.value.reason is Reason.HASH_MISMATCH


def test_models_bundle_cannot_touch_runtime_code(tmp_path: Path) -> None:
    """A bundle that says 'models' but carries code is refused, not installed."""
    code = tmp_path / "models"
    code.mkdir()
    (code / "m.tflite").write_bytes(b"m")
    bundle = build_bundle("models", 2, "t", BundleSources(models=code), tmp_path / "d")

    def edit(dst: tarfile.TarFile, member: tarfile.TarInfo, content: bytes | None) -> None:
        if member.name == "manifest.json":
            assert content is not None
            raw = json.loads(content)
            raw["files"][0]["path"] = "edgeos/__init__.py"
            content = json.dumps(raw).encode()
            member.size = len(content)
        elif member.name == "payload/models/m.tflite":
            member.name = "payload/edgeos/__init__.py"
        _copy(dst, member, content)

    with pytest.raises(Rejected) as info:
        extract_bundle(_rewrite(bundle, tmp_path / "bad.tar", edit), tmp_path / "x")
    assert info.value.reason is Reason.UNSAFE_ENTRY


def test_install_quota_exhausted_raises_enospc(make_release: MakeRelease, tmp_path: Path) -> None:
    """Size quota in the installer (not a real full disk): writes past it fail with ENOSPC."""
    with pytest.raises(InstallError) as info:
        extract_bundle(make_release("1.0.0"), tmp_path / "x", quota_bytes=100_000)
    assert info.value.reason is Reason.NO_SPACE
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC


def test_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.zst"
    junk.write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 100)
    with pytest.raises(Rejected) as info:
        read_manifest(junk)
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    ("text", "reason"),
    [("1.2.3.4.5", Reason.MALFORMED), ("v1", Reason.MALFORMED), ("100000000", Reason.FAST_FORWARD)],
)
def test_version_rules(text: str, reason: Reason) -> None:
    with pytest.raises(Rejected) as info:
        Version.parse(text)
    assert info.value.reason is reason


def test_version_ordering() -> None:
    v = Version.parse
    assert v("1.4") == v("1.4.0") < v("1.4.1") < v("1.10") < v("2")
    assert v(7) < v("7.1") and str(v("01.2")) == "1.2"
