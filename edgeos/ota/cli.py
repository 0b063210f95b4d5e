"""Command-line entry points for OTA; the top-level CLIs delegate here.

Gateway (``edgeos …``)::

    edgeos bundle build --kind full --version 1.4.0 --target rpi4-aarch64 \\
        --package edgeos --package drivers --wheelhouse wheels/ --config cfg/ --out dist/
    edgeos ota status [--json]
    edgeos ota check                 # refresh metadata, download + install what is newer
    edgeos ota install BUNDLE        # local install (USB stick, factory), same checks
    edgeos ota provision BUNDLE      # factory: first slot, committed without a trial
    edgeos ota boot-check            # ExecStartPre: count a trial attempt or fall back
    edgeos ota commit [--wait|--now] # commit the trial slot once healthy (or at once)
    edgeos ota report                # send the last outcome to the repository

The repository side (``edgeos-cloud ota …``) is :mod:`edgeos_cloud.ota.cli`.

Device settings come from ``--config FILE`` (``[device]`` and ``[ota]``), and any of
``--root``, ``--hardware``, ``--repository``, ``--trusted-root``, ``--group`` override it.
Exit codes: 0 success, 1 refused or failed (reason printed), 2 usage, 3 trial failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeos.errors import ConfigError, UpdateError
from edgeos_protocol.bundle import BUNDLE_KINDS, BundleSources, ProgressCallback

__all__ = ["gateway_main", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TRIAL_FAILED = 0, 1, 2, 3


@contextmanager
def _progress(enabled: bool) -> Iterator[ProgressCallback | None]:
    """A rich progress bar fed by ``(step, done, total)`` callbacks; nothing when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)

        yield update


# --------------------------------------------------------------------------- gateway


@dataclass(frozen=True)
class _Device:
    root: Path
    hardware: str
    device_id: str
    repository: str
    trusted_root: Path
    group: str
    health_window_s: float
    max_attempts: int
    #: The runtime's control socket (for the models-only hook), when a config was given.
    control_socket: Path | None = None
    #: The device key that seals reports (``[uplink] key_file`` or ``--key-file``).
    key_file: Path | None = None
    #: The configuration file: config bundles' profiles are re-validated against it.
    config_path: Path | None = None


def _device(args: argparse.Namespace) -> _Device:
    from edgeos.config import OtaConfig, load_config

    ota, hardware, device_id, state_dir = OtaConfig(), "generic-aarch64", "device", None
    key_file: Path | None = getattr(args, "key_file", None)
    if args.config is not None:
        config = load_config(args.config, check_drivers=False)
        ota, hardware = config.ota, config.device.hardware
        device_id, state_dir = config.device.id, config.device.state_dir
        key_file = key_file or config.uplink.key_file
    base = Path(state_dir or "/var/lib/edgeos")
    control_socket: Path | None = None
    if args.config is not None:
        sock = config.control.socket
        control_socket = sock if sock.is_absolute() else base / sock
    root = args.root or (ota.slots_dir if ota.slots_dir.is_absolute() else base / ota.slots_dir)
    trusted = args.trusted_root or (
        ota.trusted_root if ota.trusted_root.is_absolute() else base / ota.trusted_root
    )
    return _Device(
        root=Path(root),
        hardware=args.hardware or hardware,
        device_id=args.device_id or device_id,
        repository=args.repository or ota.repository_url,
        trusted_root=Path(trusted),
        group=args.group or ota.group,
        health_window_s=args.health_window if args.health_window else ota.health_window_s,
        max_attempts=ota.max_attempts,
        control_socket=control_socket,
        key_file=key_file,
        config_path=Path(args.config) if args.config is not None else None,
    )


def _slots(dev: _Device) -> Any:
    from edgeos.ota.slots import SlotManager

    return SlotManager(
        dev.root,
        hardware=dev.hardware,
        max_attempts=dev.max_attempts,
        models_hook=_models_hook(dev),
        config_check=_config_check(dev),
    )


def _config_check(dev: _Device) -> Any:
    """Config bundles carry profiles: re-validated against this gateway's own file."""
    if dev.config_path is None:
        return None
    from edgeos.profile import bundle_check

    return bundle_check(dev.config_path)


def _models_hook(dev: _Device) -> Any:
    """Tell a running runtime that new models are in place (they enter as challengers)."""
    if dev.control_socket is None:
        return None
    sock = dev.control_socket

    def hook(path: Path) -> None:
        from edgeos.control import ControlError, request

        try:
            request(sock, "models.updated", path=str(path))
        except ControlError as exc:
            # Not running (or inference off): the models are loaded at the next start.
            print(f"runtime not told about the new models: {exc}", file=sys.stderr)

    return hook


def _client(dev: _Device) -> Any:
    from edgeos.ota.client import ClientSettings, OtaClient

    if not dev.repository:
        raise SystemExit("no repository URL: set [ota] repository_url or pass --repository")
    return OtaClient(
        ClientSettings(
            repository_url=dev.repository,
            trusted_root=dev.trusted_root,
            cache_dir=dev.root / "tuf",
            hardware=dev.hardware,
            group=dev.group,
        )
    )


def _keyring(dev: _Device) -> Any:
    """The device keyring that seals reports (refuses unsafe or missing key files)."""
    from edgeos_protocol.crypto import Keyring

    if dev.key_file is None:
        raise SystemExit("reports are sealed with the device key: pass --config or --key-file")
    return Keyring.load(dev.key_file)


def _gateway_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeos", description="edgeos bundles and OTA")
    top = parser.add_subparsers(dest="area", required=True)

    bundle = top.add_parser("bundle", help="release bundles").add_subparsers(
        dest="cmd", required=True
    )
    build = bundle.add_parser("build", help="build a bundle")
    build.add_argument("--kind", choices=BUNDLE_KINDS, required=True)
    build.add_argument("--version", required=True)
    build.add_argument("--target", required=True, help="hardware target, e.g. rpi4-aarch64")
    build.add_argument("--package", type=Path, action="append", default=[])
    build.add_argument("--wheelhouse", type=Path)
    build.add_argument("--requirements", type=Path, help="requirements lock for the target")
    build.add_argument("--models", type=Path)
    build.add_argument("--config-dir", type=Path)
    build.add_argument("--entry", help="module run with python -m from the slot")
    build.add_argument("--no-compress", action="store_true")
    build.add_argument("--out", type=Path, default=Path("dist"))
    build.add_argument("--quiet", action="store_true")

    ota = top.add_parser("ota", help="over-the-air updates").add_subparsers(
        dest="cmd", required=True
    )

    def device_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        p = ota.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path)
        p.add_argument("--root", type=Path, help="OTA root (slots, state)")
        p.add_argument("--hardware")
        p.add_argument("--device-id")
        p.add_argument("--repository", help="repository base URL")
        p.add_argument("--trusted-root", type=Path)
        p.add_argument("--group")
        p.add_argument("--health-window", type=float)
        p.add_argument("--key-file", type=Path, help="device key sealing reports")
        p.add_argument("--json", action="store_true")
        return p

    device_cmd("status", "show slots, versions, last outcome")
    check = device_cmd("check", "check the repository and install what is newer")
    check.add_argument("--force", action="store_true", help="retry a version that failed")
    check.add_argument("--report", action="store_true", help="report the outcome afterwards")
    install = device_cmd("install", "install a local bundle file")
    install.add_argument("bundle", type=Path)
    install.add_argument("--force", action="store_true")
    provision = device_cmd("provision", "factory install into slot a (committed)")
    provision.add_argument("bundle", type=Path)
    device_cmd("boot-check", "run before the service starts (ExecStartPre)")
    commit = device_cmd("commit", "commit the trial slot")
    mode = commit.add_mutually_exclusive_group()
    mode.add_argument("--now", action="store_true", help="commit without waiting for health")
    mode.add_argument("--wait", action="store_true", help="watch health.json, then commit")
    commit.add_argument("--timeout", type=float, help="trial deadline (default 3 × window)")
    commit.add_argument("--stale-after", type=float, default=15.0)
    device_cmd("report", "send the last outcome to the repository")
    device_cmd("recover", "after a crash loop: end a trial so the previous slot boots (OnFailure)")
    return parser


def gateway_main(argv: Sequence[str]) -> int:
    """``edgeos bundle …`` and ``edgeos ota …``; returns the process exit code."""
    parser = _gateway_parser()
    args = parser.parse_args(list(argv))
    try:
        if args.area == "bundle":
            return _bundle_build(args)
        dev = _device(args)
        handler = {
            "status": _ota_status,
            "check": _ota_check,
            "install": _ota_install,
            "provision": _ota_provision,
            "boot-check": _ota_boot_check,
            "commit": _ota_commit,
            "report": _ota_report,
            "recover": _ota_recover,
        }[args.cmd]
        return handler(args, dev)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except UpdateError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _bundle_build(args: argparse.Namespace) -> int:
    from edgeos_protocol.bundle import build_bundle

    sources = BundleSources(
        packages=tuple(args.package),
        wheelhouse=args.wheelhouse,
        requirements_lock=args.requirements,
        models=args.models,
        config=args.config_dir,
    )
    try:
        with _progress(not args.quiet and sys.stderr.isatty()) as progress:
            path = build_bundle(
                args.kind,
                args.version,
                args.target,
                sources,
                args.out,
                compress=not args.no_compress,
                entry=args.entry,
                progress=progress,
            )
    except ValueError as exc:
        print(f"cannot build: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(path)
    return EXIT_OK


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if args.json else text)


def _ota_status(args: argparse.Namespace, dev: _Device) -> int:
    status = _slots(dev).status()
    lines = [
        f"active slot {status['active']} ({status['committed_version']})",
        f"trial: {status['trial'] or '-'}"
        + (f" {status['trial_version']} attempts {status['attempts']}" if status["trial"] else ""),
        f"version floors: {status['floors']}",
        f"last failure: {status['last_failure'] or '-'}",
    ]
    _emit(args, status, "\n".join(lines))
    return EXIT_OK


def _ota_check(args: argparse.Namespace, dev: _Device) -> int:
    slots = _slots(dev)
    client = _client(dev)
    with _progress(not args.json and sys.stderr.isatty()) as progress:
        results = client.check_and_install(slots, force=args.force, progress=progress)
    if args.report:
        client.report_outcome(slots, dev.device_id, _keyring(dev))
    text = "\n".join(
        f"{r.kind}: {r.status}"
        + (f" {r.version}" if r.version else "")
        + (f" ({r.reason}: {r.detail})" if r.reason else "")
        + (" – restart required" if r.restart_required else "")
        for r in results
    )
    _emit(args, [asdict(r) for r in results], text)
    return EXIT_FAILED if any(r.status in ("rejected", "failed") for r in results) else EXIT_OK


def _ota_install(args: argparse.Namespace, dev: _Device) -> int:
    slots = _slots(dev)
    from edgeos_protocol.bundle import read_manifest

    try:
        with _progress(not args.json and sys.stderr.isatty()) as progress:
            result = slots.install(args.bundle, force=args.force, progress=progress)
    except UpdateError as exc:
        kind: str = "unknown"
        version: str | None = None
        try:
            manifest = read_manifest(args.bundle)
            kind, version = manifest.kind, manifest.version
        except UpdateError:
            pass
        slots.record_rejection(kind, version, exc)
        raise
    _emit(
        args,
        asdict(result),
        f"installed {result.kind} {result.version}"
        + (f" into slot {result.slot}; restart to try it" if result.restart_required else ""),
    )
    return EXIT_OK


def _ota_provision(args: argparse.Namespace, dev: _Device) -> int:
    result = _slots(dev).provision(args.bundle)
    _emit(args, asdict(result), f"provisioned {result.version} into slot {result.slot}")
    return EXIT_OK


def _ota_boot_check(args: argparse.Namespace, dev: _Device) -> int:
    decision = _slots(dev).boot_check()
    for event in decision.events:
        print(event, file=sys.stderr)
    _emit(
        args,
        asdict(decision),
        f"slot={decision.slot} version={decision.version} trial={decision.trial} "
        f"entry={decision.entry} path={decision.path}",
    )
    return EXIT_OK if decision.ok else EXIT_FAILED


def _ota_commit(args: argparse.Namespace, dev: _Device) -> int:
    from edgeos.ota.health import HealthFile
    from edgeos.ota.trial import TrialMonitor, TrialOutcome

    slots = _slots(dev)
    if args.now:
        state = slots.commit()
        print(f"committed slot {state.active} ({state.committed_version})")
        return EXIT_OK
    health = HealthFile(slots.health_path)
    monitor = TrialMonitor(
        slots,
        health_window_s=dev.health_window_s,
        trial_timeout_s=args.timeout,
        stale_after_s=args.stale_after,
        poll=lambda: health.read(max_age_s=args.stale_after),
        poll_interval_s=1.0,
        why_not=lambda: health.refused,
    )
    outcome = asyncio.run(monitor.run())
    state = slots.read_state()
    if outcome is TrialOutcome.FAILED:
        print(f"trial failed: {state.last_failure}", file=sys.stderr)
        return EXIT_TRIAL_FAILED
    print(
        f"committed slot {state.active} ({state.committed_version})"
        if outcome is TrialOutcome.COMMITTED
        else "no slot on trial"
    )
    return EXIT_OK


def _ota_recover(args: argparse.Namespace, dev: _Device) -> int:
    """Run by ``edgeos-recovery.service`` when the runtime hit its start limit."""
    slots = _slots(dev)
    state = slots.read_state()
    if state.trial is None:
        print(
            "no slot on trial: the committed version itself keeps failing; nothing to fall back "
            "to (see `journalctl -u edgeos` and the configuration)",
            file=sys.stderr,
        )
        return EXIT_OK
    from edgeos_protocol.outcome import Reason

    state = slots.fail_trial(Reason.CRASH_LOOP, "edgeos.service hit its start limit")
    print(f"trial ended; slot {state.active} ({state.committed_version}) boots next")
    return EXIT_OK


def _ota_report(args: argparse.Namespace, dev: _Device) -> int:
    sent = _client(dev).report_outcome(_slots(dev), dev.device_id, _keyring(dev))
    print("reported" if sent else "nothing to report")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgeos.ota.cli <gateway args>``."""
    return gateway_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
