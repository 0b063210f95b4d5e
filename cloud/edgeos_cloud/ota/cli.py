"""The OTA repository's commands (``edgeos-cloud ota …``)::

    init --repo R --root-keys K | publish BUNDLE --repo R --group G | serve --repo R
    campaign create NAME --target PATH --stage canary:canary:0:1 --stage all:default:0.1:5
    campaign start|advance|status NAME | rotate-key ROLE [--revoke KEYID] | refresh

Exit codes: 0 success, 1 refused or failed (reason printed), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from edgeos_protocol.errors import UpdateError

__all__ = ["repo_main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _repo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeos-cloud ota", description="OTA repository")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, help_text: str, *, root_keys: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--repo", type=Path, required=True)
        if root_keys:
            p.add_argument("--root-keys", type=Path, help="directory of OFFLINE root keys")
        return p

    init = cmd("init", "create a repository and its keys", root_keys=True)
    init.add_argument("--root-key-count", type=int, default=1)
    init.add_argument("--root-threshold", type=int, default=1)
    init.add_argument("--timestamp-expiry-hours", type=float, default=24)
    init.add_argument("--snapshot-expiry-days", type=float, default=7)
    init.add_argument("--targets-expiry-days", type=float, default=90)
    init.add_argument("--root-expiry-days", type=float, default=365)
    publish = cmd("publish", "publish a bundle")
    publish.add_argument("bundle", type=Path)
    publish.add_argument("--group", action="append", default=[])
    serve = cmd("serve", "serve metadata, targets and /reports over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8600)
    serve.add_argument(
        "--registry",
        type=Path,
        help="the receiver's registry directory: device keys that authenticate /reports and "
        "/certificates, and the CA that answers the latter (without it, both are off)",
    )
    cmd("refresh", "re-sign snapshot and timestamp (run well inside the timestamp expiry)")
    rotate = cmd("rotate-key", "replace or revoke a role key", root_keys=True)
    rotate.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    rotate.add_argument("--revoke", help="key id to take out (default: all current keys)")
    trusted = cmd("trusted-root", "write root metadata for provisioning devices")
    trusted.add_argument("--out", type=Path, required=True)

    campaign = sub.add_parser("campaign", help="staged roll-outs").add_subparsers(
        dest="campaign_cmd", required=True
    )
    create = campaign.add_parser("create")
    create.add_argument("name")
    create.add_argument("--repo", type=Path, required=True)
    create.add_argument("--target", required=True, help="published target path")
    create.add_argument(
        "--stage", action="append", required=True, help="name:group[,group][:rate[:min]]"
    )
    for name in ("start", "advance", "status"):
        p = campaign.add_parser(name)
        p.add_argument("name")
        p.add_argument("--repo", type=Path, required=True)
    return parser


def repo_main(argv: Sequence[str]) -> int:
    """``edgeos-cloud ota …``; returns the process exit code."""
    argv = list(argv)
    if argv[:1] == ["ota"]:
        argv = argv[1:]
    args = _repo_parser().parse_args(argv)
    from edgeos_cloud.ota.repository import Expiry, OtaRepository, RootKeysMissingError

    try:
        if args.cmd == "init":
            if args.root_keys is None:
                print("init needs --root-keys DIR (keep it offline afterwards)", file=sys.stderr)
                return EXIT_USAGE
            OtaRepository.init(
                args.repo,
                args.root_keys,
                root_keys=args.root_key_count,
                root_threshold=args.root_threshold,
                expiry=Expiry(
                    root=args.root_expiry_days * 86400,
                    targets=args.targets_expiry_days * 86400,
                    snapshot=args.snapshot_expiry_days * 86400,
                    timestamp=args.timestamp_expiry_hours * 3600,
                ),
            )
            print(f"repository created in {args.repo}; root keys in {args.root_keys}")
        elif args.cmd == "publish":
            published = OtaRepository(args.repo).publish(args.bundle, groups=args.group)
            print(json.dumps(asdict(published), indent=2))
        elif args.cmd == "refresh":
            OtaRepository(args.repo).refresh_timestamp()
        elif args.cmd == "rotate-key":
            repo = OtaRepository(args.repo, root_keys_dir=args.root_keys)
            print(repo.rotate_key(args.role, revoke=args.revoke))
        elif args.cmd == "trusted-root":
            args.out.write_bytes(OtaRepository(args.repo).trusted_root())
        elif args.cmd == "serve":
            return _serve_forever(args.repo, args.host, args.port, args.registry)
        elif args.cmd == "campaign":
            return _campaign(args)
    except (RootKeysMissingError, ValueError, KeyError, RuntimeError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except UpdateError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _campaign(args: argparse.Namespace) -> int:
    from edgeos_cloud.ota.campaign import Campaign, Stage
    from edgeos_cloud.ota.repository import OtaRepository

    repo = OtaRepository(args.repo)
    if args.campaign_cmd == "create":
        Campaign.create(repo, args.name, args.target, [Stage.parse(s) for s in args.stage])
    campaign = Campaign(repo, args.name)
    if args.campaign_cmd == "start":
        campaign.start()
    elif args.campaign_cmd == "advance":
        campaign.advance()
    print(json.dumps(campaign.summary(), indent=2))
    return EXIT_OK


def _serve_forever(repo_dir: Path, host: str, port: int, registry: Path | None) -> int:
    from edgeos_cloud.ota.reports import ReportIntake
    from edgeos_cloud.ota.repository import serve

    # Reports move campaigns: they are taken only sealed under a registered device's key.
    intake = None if registry is None else ReportIntake.from_registry(repo_dir, registry)
    # Certificate renewal (docs/credentials.md): sealed like reports, answered sealed.
    renewal = None
    if registry is not None:
        from edgeos_cloud.renewal import CertificateRenewal

        renewal = CertificateRenewal(registry, repo_dir)
    server = serve(
        repo_dir,
        host,
        port,
        on_report=None if intake is None else intake.accept,
        on_certificate=None if renewal is None else renewal.answer,
    )
    print(f"serving {repo_dir} on {server.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.close()
    return EXIT_OK
