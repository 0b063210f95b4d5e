"""``edgeos-receiver``: run the receiver, manage devices, query samples, shadows.

::

    edgeos-receiver init DIR                         # CA, receiver + broker certs, receiver.toml,
                                                     # broker/acl + broker/mosquitto.conf
    edgeos-receiver run --config FILE
    edgeos-receiver device add ID [--bundle FILE]    # key + client cert → credential bundle
    edgeos-receiver device revoke ID
    edgeos-receiver device list
    edgeos-receiver devices                          # last seen, backlog, skips, rejects,
                                                     # quarantined
    edgeos-receiver query --device D [--tag T] [--since ISO|EPOCH] [--until …] [--limit N]
    edgeos-receiver quarantine list [--device D]     # batches kept sealed, with the reason
    edgeos-receiver quarantine show D EPOCH SEQ [--raw FILE]
    edgeos-receiver quarantine reingest [--device D] [--epoch E --seq S]  # after a fix
    edgeos-receiver shadow get D
    edgeos-receiver shadow set D TAG VALUE           # queue a desired change (a command)
    edgeos-receiver pki refresh [--ota-repo R] [--broker-pid-file F] [--textfile F]
    edgeos-receiver pki status | rollover-ca | retire-ca   # docs/credentials.md

Every subcommand takes ``--config FILE`` (default ``$EDGEOS_RECEIVER_CONFIG`` or
``./receiver.toml``). Exit codes: 0 ok, 1 failure, 2 invalid configuration or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeos_cloud.receiver.config import ReceiverConfig, load_receiver_config
from edgeos_cloud.receiver.pki import CertificateAuthority
from edgeos_cloud.receiver.registry import DeviceRegistry
from edgeos_cloud.receiver.storage import QuarantineEntry, Storage, open_storage
from edgeos_cloud.timefmt import parse_time
from edgeos_protocol.credentials import check_device_id
from edgeos_protocol.errors import ConfigError, EdgeosError
from edgeos_protocol.pipes import quiet_on_closed_pipe

__all__ = ["main", "parse_time"]

#: ``devices`` lists at most this many announced gaps per device (the last ones).
_MAX_RANGES_SHOWN = 100


def iso(ts_us: int | None) -> str | None:
    """ISO 8601 UTC with µs; None for None and for times outside Python's datetime range
    (years 1–9999: a stored time from a broken device clock)."""
    if ts_us is None:
        return None
    try:
        when = _EPOCH + dt.timedelta(microseconds=ts_us)
    except OverflowError:
        return None
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("EDGEOS_RECEIVER_CONFIG", "receiver.toml")),
        help="receiver TOML file (default: $EDGEOS_RECEIVER_CONFIG or ./receiver.toml)",
    )
    p = argparse.ArgumentParser(prog="edgeos-receiver", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a receiver directory (CA, certificates, config)")
    init.add_argument("directory", type=Path)
    init.add_argument("--broker", default="mqtts://127.0.0.1:8883")
    init.add_argument("--host", action="append", default=None, help="broker SAN (repeatable)")
    sub.add_parser("run", parents=[common], help="run the receiver")
    dev = sub.add_parser("device", help="provision, revoke and list devices")
    dsub = dev.add_subparsers(dest="device_command", required=True)
    add = dsub.add_parser("add", parents=[common], help="register a device, write its bundle")
    add.add_argument("device")
    add.add_argument("--bundle", type=Path, help="bundle file (default ./<ID>.credentials.json)")
    add.add_argument("--group", help="similarity group: start with its champion models + profile")
    add.add_argument("--channel", help="the device's OTA channel ([ota] group; default: its id)")
    add.add_argument("--fleet-home", type=Path, help="fleet state folder (with --group)")
    add.add_argument("--ota-repo", type=Path, help="the OTA repository (with --group)")
    rev = dsub.add_parser("revoke", parents=[common], help="disable a device's keys and cert")
    rev.add_argument("device")
    dsub.add_parser("list", parents=[common], help="registered devices")
    sub.add_parser("devices", parents=[common], help="last seen, backlog and rejects")
    q = sub.add_parser("query", parents=[common], help="samples as JSON lines, in time order")
    q.add_argument("--device", required=True)
    q.add_argument("--tag")
    q.add_argument("--since", type=parse_time)
    q.add_argument("--until", type=parse_time)
    q.add_argument("--limit", type=int)
    sh = sub.add_parser("shadow", help="reported and desired state of a device")
    ssub = sh.add_subparsers(dest="shadow_command", required=True)
    get = ssub.add_parser("get", parents=[common])
    get.add_argument("device")
    put = ssub.add_parser("set", parents=[common])
    put.add_argument("device")
    put.add_argument("tag")
    put.add_argument("value", help='JSON value (42, 1.5, true, "text") or a bare string')
    qr = sub.add_parser("quarantine", help="batches kept sealed: list, show, re-ingest")
    qsub = qr.add_subparsers(dest="quarantine_command", required=True)
    ql = qsub.add_parser("list", parents=[common], help="quarantined batches, oldest first")
    ql.add_argument("--device")
    ql.add_argument("--limit", type=int)
    qs = qsub.add_parser("show", parents=[common], help="one quarantined batch")
    qs.add_argument("device")
    qs.add_argument("epoch", type=_epoch_arg, help="hex (as listed) or decimal")
    qs.add_argument("seq", type=int)
    qs.add_argument("--raw", type=Path, help="also write its sealed bytes to this file")
    qi = qsub.add_parser(
        "reingest", parents=[common], help="open them again with the current limits; store"
    )
    qi.add_argument("--device")
    qi.add_argument("--epoch", type=_epoch_arg)
    qi.add_argument("--seq", type=int)
    _pki_parser(sub, common)
    return p


def _epoch_arg(text: str) -> int:
    try:
        return int(text, 16) if not text.isdigit() or len(text) == 16 else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an epoch id") from None


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgeos-receiver`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ota"]:
        # The update repository (TUF) has its own commands: init, publish, serve, campaign …
        from edgeos_cloud.ota.cli import repo_main

        return repo_main(argv[1:])
    if argv[:1] == ["models"]:
        # The model lifecycle (registry, gate, retrain, publish, drift): docs/model-lifecycle.md.
        from edgeos_cloud.models.cli import models_main

        return models_main(argv[1:])
    if argv[:1] == ["fleet"]:
        # Mesh twin learning (groups, leaderboard, competitions, rollouts): docs/fleet.md.
        from edgeos_cloud.fleet.cli import fleet_main

        return fleet_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args.directory, args.broker, args.host or ["127.0.0.1", "localhost"])
        config = load_receiver_config(args.config)
        logging.basicConfig(
            level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if args.command == "run":
            return _run(config)
        if args.command == "device":
            return _device(config, args)
        if args.command == "devices":
            return _devices(config)
        if args.command == "query":
            return _query(config, args)
        if args.command == "shadow":
            return _shadow(config, args)
        if args.command == "quarantine":
            return _quarantine(config, args)
        if args.command == "pki":
            return _pki(config, args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader went away: quiet_on_closed_pipe ends quietly
    except (EdgeosError, OSError, KeyError, ValueError, FileExistsError) as exc:
        print(f"edgeos-receiver: {exc}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse rejects unknown commands


# --------------------------------------------------------------------------- commands


def _run(config: ReceiverConfig) -> int:
    from edgeos_cloud.receiver.service import Receiver

    async def serve() -> None:
        receiver = Receiver(config)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # A plain cancellation: the broker loop recognises one the MQTT client swallowed from
        # Task.cancelling() (edgeos_protocol.aio), no stop flag needed.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await receiver.run()

    asyncio.run(serve())
    return 0


@contextlib.contextmanager
def _storage(config: ReceiverConfig) -> Iterator[Storage]:
    storage = open_storage(config.storage.url, sqlite_synchronous=config.storage.sqlite_synchronous)
    try:
        yield storage
    finally:
        storage.close()


def _device(config: ReceiverConfig, args: argparse.Namespace) -> int:
    from edgeos_cloud.receiver.provisioning import create_device, revoke_device

    registry = DeviceRegistry(config.registry.dir)
    if args.device_command == "add":
        try:
            check_device_id(args.device)
        except ValueError as exc:
            print(f"edgeos-receiver: {exc}", file=sys.stderr)
            return 2
        ca = CertificateAuthority.open_or_create(config.registry.dir / "ca")
        bundle = args.bundle or Path(f"{args.device}.credentials.json")
        if args.group and (args.fleet_home is None or args.ota_repo is None):
            print("edgeos-receiver: --group needs --fleet-home and --ota-repo", file=sys.stderr)
            return 2
        channel = (args.channel or args.device) if args.group else None
        record = create_device(
            registry, ca, args.device, config.device_broker_url, bundle, ota_group=channel
        )
        out: dict[str, object] = {
            "device": record.device,
            "key_id": record.current_key_id,
            "bundle": str(bundle),
        }
        if args.group:
            from edgeos_cloud.fleet.bootstrap import Bootstrap
            from edgeos_cloud.fleet.rollout import Rollouts

            enrolment = Bootstrap(Rollouts(args.ota_repo, args.fleet_home)).enroll(
                args.device, args.group, channel
            )
            out["bootstrap"] = {
                "group": enrolment.group,
                "channel": enrolment.channel,
                "models": enrolment.models,
                "state": enrolment.state,
            }
        print(json.dumps(out))
        return 0
    if args.device_command == "revoke":
        ca = CertificateAuthority.open_or_create(config.registry.dir / "ca")
        record = revoke_device(registry, ca, args.device)
        print(
            json.dumps({"device": record.device, "status": record.status, "crl": str(ca.crl_file)})
        )
        return 0
    for record in registry.list():
        print(
            json.dumps(
                {
                    "device": record.device,
                    "status": record.status,
                    "key_ids": sorted(record.keys),
                    "created": iso(int(record.created_at * 1e6)),
                    "revoked": iso(
                        None if record.revoked_at is None else int(record.revoked_at * 1e6)
                    ),
                }
            )
        )
    return 0


def _devices(config: ReceiverConfig) -> int:
    ca_dir = config.registry.dir / "ca"
    expiries = CertificateAuthority(ca_dir).device_expiries() if ca_dir.exists() else {}
    with _storage(config) as storage:
        for s in storage.device_summaries():
            print(
                json.dumps(
                    {
                        "device": s.device,
                        "first_seen": iso(s.first_seen_us),
                        "last_seen": iso(s.last_seen_us),
                        "state": s.state,
                        "state_since": iso(s.state_since_us),
                        "batches": s.batches,
                        "samples": s.samples,
                        "backlog": s.backlog,
                        "skipped": s.skipped,
                        "skipped_ranges": [
                            [f"{epoch:016x}", first, last]
                            for epoch, first, last in s.skipped_ranges[-_MAX_RANGES_SHOWN:]
                        ],
                        "rejects": s.rejects,
                        "quarantined": s.quarantined,
                        "quarantine_reasons": s.quarantine_reasons,
                        "cert_expires": _iso_dt(expiries.get(s.device)),
                    }
                )
            )
    return 0


def _json_value(value: float | str | None) -> float | str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _query(config: ReceiverConfig, args: argparse.Namespace) -> int:
    out = sys.stdout
    with _storage(config) as storage:
        for row in storage.query_samples(args.device, args.tag, args.since, args.until, args.limit):
            doc: dict[str, Any] = {
                "device": row.device,
                "tag": row.tag,
                "ts": iso(row.ts_us),
                "value": _json_value(row.value),
                "quality": row.quality,
            }
            if doc["ts"] is None:  # outside datetime's years 1–9999: the raw µs instead
                doc["ts_us"] = row.ts_us
            out.write(json.dumps(doc) + "\n")
    return 0


def _quarantine_doc(entry: QuarantineEntry) -> dict[str, Any]:
    return {
        "device": entry.device,
        "epoch": f"{entry.epoch:016x}",
        "seq": entry.seq,
        "reason": entry.reason,
        "detail": entry.detail,
        "received": iso(entry.received_us),
        "created": iso(entry.created_us),
        "attempts": entry.attempts,
        "last": iso(entry.last_us),
        "bytes": entry.nbytes,
        "key_id": entry.key_id,
    }


def _quarantine(config: ReceiverConfig, args: argparse.Namespace) -> int:
    from edgeos_cloud.receiver.ingest import BatchOpener, reingest

    with _storage(config) as storage:
        if args.quarantine_command == "list":
            for entry in storage.quarantined(args.device, args.limit):
                print(json.dumps(_quarantine_doc(entry)))
            return 0
        if args.quarantine_command == "show":
            entries = [
                e
                for e in storage.quarantined(args.device)
                if e.epoch == args.epoch and e.seq == args.seq
            ]
            record = storage.quarantined_record(args.device, args.epoch, args.seq)
            if not entries or record is None:
                print("edgeos-receiver: no such quarantined batch", file=sys.stderr)
                return 1
            if args.raw is not None:
                args.raw.write_bytes(record.payload)
            print(json.dumps(_quarantine_doc(entries[0]), indent=1))
            return 0
        opener = BatchOpener(
            DeviceRegistry(config.registry.dir),
            config.limits.max_payload_bytes,
            limits=config.limits,
        )
        results = reingest(storage, opener, device=args.device, epoch=args.epoch, seq=args.seq)
        for result in results:
            print(json.dumps({**result, "epoch": f"{result['epoch']:016x}"}))
        return 0 if all(r["outcome"] == "stored" for r in results) else 1


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _shadow(config: ReceiverConfig, args: argparse.Namespace) -> int:
    with _storage(config) as storage:
        if args.shadow_command == "set":
            command = storage.enqueue_command(
                args.device, {args.tag: _parse_value(args.value)}, int(time.time() * 1e6)
            )
            print(
                json.dumps(
                    {
                        "device": command.device,
                        "version": command.version,
                        "id": command.id,
                        "status": command.status,
                    }
                )
            )
            return 0
        reported = {
            name: {"ts": iso(v.ts_us), "value": _json_value(v.value), "quality": v.quality}
            for name, v in storage.reported(args.device).items()
        }
        desired: dict[str, Any] = {}
        for c in storage.commands(args.device):
            for tag, value in c.desired.items():
                desired[tag] = {
                    "value": value,
                    "version": c.version,
                    "status": c.status,
                    "result": c.results,
                    "requested": iso(c.requested_us),
                    "answered": iso(c.answered_us),
                }
        print(
            json.dumps({"device": args.device, "reported": reported, "desired": desired}, indent=1)
        )
    return 0


def _init(directory: Path, broker: str, hosts: list[str]) -> int:
    from edgeos_cloud.broker import device_acl, mosquitto_config

    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.open_or_create(directory / "registry" / "ca")
    pki = directory / "pki"
    ca.issue_client("receiver", pki, role="receiver")
    server = ca.issue_server(hosts, pki)
    assert server.cert_file is not None and server.key_file is not None
    # The broker's half, next to the CA: the ACL (devices: own topics; receivers: all) and the
    # TLS listener lines to include in mosquitto.conf.
    broker_dir = directory / "broker"
    broker_dir.mkdir(exist_ok=True)
    acl = broker_dir / "acl"
    acl.write_text(device_acl(ca.service_identities("receiver")), encoding="utf-8")
    # The snippet is the devices' TLS listener. A plain mqtt:// URL is how the receiver itself
    # reaches the broker (a listener on the broker host, docs/local-broker.md); devices still
    # connect over TLS, on 8883.
    tls = urlsplit(broker).scheme == "mqtts"
    port = (urlsplit(broker).port or 8883) if tls else 8883
    snippet = broker_dir / "mosquitto.conf"
    snippet.write_text(
        mosquitto_config(
            ca_file=ca.ca_file.resolve(),
            cert_file=server.cert_file.resolve(),
            key_file=server.key_file.resolve(),
            crl_file=ca.crl_file.resolve(),
            acl_file=acl.resolve(),
            port=port,
        ),
        encoding="utf-8",
    )
    config = directory / "receiver.toml"
    # [broker.tls] only for mqtts://: a plain mqtt:// receiver would ignore it.
    tls_lines = (
        [
            "[broker.tls]",
            f'ca_file = "{ca.ca_file.relative_to(directory)}"',
            'cert_file = "pki/receiver.crt"',
            'key_file = "pki/receiver.key"',
        ]
        if tls
        else []
    )
    if not config.exists():
        config.write_text(
            "\n".join(
                [
                    "[broker]",
                    f'url = "{broker}"',
                    'group = "receivers"',
                    *tls_lines,
                    "",
                    "[storage]",
                    'url = "sqlite:///data/receiver.db"',
                    "",
                    "[registry]",
                    'dir = "registry"',
                    "",
                ]
            ),
            encoding="utf-8",
        )
    print(
        json.dumps(
            {
                "config": str(config),
                "ca": str(ca.ca_file),
                "crl": str(ca.crl_file),
                "broker_cert": str(pki / "server.crt"),
                "broker_key": str(pki / "server.key"),
                "broker_acl": str(acl),
                "broker_config": str(snippet),
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- pki


def _pki_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    pki = sub.add_parser("pki", help="renew the CRL and service certificates, CA rollover")
    psub = pki.add_subparsers(dest="pki_command", required=True)
    refresh = psub.add_parser(
        "refresh",
        parents=[common],
        help="re-sign the CRL, renew service certificates inside their window, refresh TUF "
        "metadata, reload the broker (run by edgeos-cloud-refresh.timer)",
    )
    refresh.add_argument("--crl-within-days", type=float, default=23.0)
    refresh.add_argument("--cert-within-days", type=float, default=30.0)
    refresh.add_argument(
        "--server-cert",
        type=Path,
        help="the broker's certificate (default: pki/server.crt next to the config); its key "
        "is the .key next to it",
    )
    refresh.add_argument("--force-server", action="store_true", help="renew the broker's now")
    refresh.add_argument("--ota-repo", type=Path, help="also `ota refresh` this repository")
    refresh.add_argument(
        "--broker-pid-file", type=Path, help="SIGHUP this pid when something changed"
    )
    refresh.add_argument("--textfile", type=Path, help="write expiry metrics (node_exporter)")
    for name, text in (
        ("status", "when each credential expires (JSON)"),
        ("rollover-ca", "start a CA rollover: new signing CA, bundle = new + old"),
        ("retire-ca", "end the rollover overlap: drop the previous CA"),
    ):
        p = psub.add_parser(name, parents=[common], help=text)
        p.add_argument("--server-cert", type=Path)
        p.add_argument("--ota-repo", type=Path)
        if name == "rollover-ca":
            p.add_argument("--name", default="edgeos CA")
            p.add_argument("--days", type=int, default=3650)


def _iso_dt(when: dt.datetime | None) -> str | None:
    return None if when is None else when.astimezone(dt.UTC).isoformat()


def _pki(config: ReceiverConfig, args: argparse.Namespace) -> int:
    from edgeos_cloud.renewal import credential_expiries, write_textfile

    ca = CertificateAuthority(config.registry.dir / "ca")
    base = args.config.resolve().parent
    server_cert = args.server_cert or base / "pki" / "server.crt"
    if args.pki_command == "rollover-ca":
        ca.rollover(args.name, days=args.days)
        print(json.dumps({"ca": str(ca.ca_file), "crl": str(ca.crl_file), "reload": True}))
        return 0
    if args.pki_command == "retire-ca":
        print(json.dumps({"retired": ca.retire(), "reload": True}))
        return 0
    if args.pki_command == "status":
        doc = credential_expiries(ca, server_cert, args.ota_repo)
        print(json.dumps({k: _iso_dt(v) for k, v in sorted(doc.items())}, indent=1))
        return 0
    changed: list[str] = []
    now = dt.datetime.now(dt.UTC)
    next_update = ca.crl_next_update()
    if next_update is None or next_update - now <= dt.timedelta(days=args.crl_within_days):
        ca.refresh_crl()
        changed.append("crl")
    within = dt.timedelta(days=args.cert_within_days)
    if server_cert.exists():
        renewed = ca.renew_in_place(
            server_cert, server_cert.with_suffix(".key"), within=within, force=args.force_server
        )
        if renewed is not None:
            changed.append("server_certificate")
    tls = config.broker.tls
    if (
        tls is not None
        and tls.cert_file.exists()
        and tls.key_file.exists()
        and ca.renew_in_place(tls.cert_file, tls.key_file, within=within) is not None
    ):
        changed.append("receiver_certificate")
    if args.ota_repo is not None:
        from edgeos_cloud.ota.repository import OtaRepository

        OtaRepository(args.ota_repo).refresh_timestamp()
        changed.append("tuf")
    reloaded = False
    broker_files = {"crl", "server_certificate"}
    if args.broker_pid_file is not None and broker_files & set(changed):
        # Mosquitto 2.0 re-reads cafile, certfile/keyfile and crlfile on SIGHUP and keeps
        # its connected clients (measured: docs/credentials.md).
        os.kill(int(args.broker_pid_file.read_text().split()[0]), signal.SIGHUP)
        reloaded = True
    expiries = credential_expiries(ca, server_cert, args.ota_repo)
    if args.textfile is not None:
        write_textfile(args.textfile, expiries)
    print(
        json.dumps(
            {
                "changed": changed,
                "broker_reloaded": reloaded,
                "expiries": {k: _iso_dt(v) for k, v in sorted(expiries.items())},
            }
        )
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
