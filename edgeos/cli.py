"""The ``edgeos`` command line.

Subcommands that belong to a part (``bundle``, ``ota``) hand their arguments to that
part's own ``main`` so each part keeps its options next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from edgeos import __version__
from edgeos.config import Config, load_config
from edgeos.errors import ConfigError
from edgeos_protocol.pipes import quiet_on_closed_pipe

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# Subcommands implemented by a part: name -> (module, function, help, keep the command word).
_DELEGATED: dict[str, tuple[str, str, str, bool]] = {
    "bundle": (
        "edgeos.ota.cli",
        "gateway_main",
        "build a release bundle (full/models/config)",
        True,
    ),
    "ota": (
        "edgeos.ota.cli",
        "gateway_main",
        "A/B slots: status, check, install, boot-check, commit, recover",
        True,
    ),
    "profile": (
        "edgeos.profile",
        "main",
        "configuration profiles: export, diff, check",
        True,
    ),
}


def _summary(config: Config, path: str) -> str:
    tags = config.all_tags
    drivers = Counter(c.driver for c in config.connections)
    per_group = Counter(t.scan_group for t in tags)
    writable = sum(1 for t in tags if t.writable)
    up = config.uplink
    uplink = f"every {up.interval_s:g} s to {up.broker}" if up.enabled else "disabled"
    lines = [
        f"{path}: valid",
        f"  device      {config.device.id}"
        + (f" (site {config.device.site})" if config.device.site else ""),
        f"  connections {len(config.connections)} ("
        + ", ".join(f"{n}× {d}" for d, n in sorted(drivers.items()))
        + ")",
        f"  tags        {len(tags)} ({writable} writable)",
        "  scan groups "
        + ", ".join(
            f"{g.name} {g.period_ms:g} ms: {per_group.get(g.name, 0)} tags"
            for g in config.scan_groups
        ),
        f"  uplink      {uplink}",
        f"  inference   {len(config.inference.models)} model(s), "
        + ("enabled" if config.inference.enabled else "disabled"),
        f"  ota         {'group ' + config.ota.group if config.ota.enabled else 'disabled'}",
    ]
    return "\n".join(lines)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, check_drivers=not args.no_drivers)
    except ConfigError as exc:
        print(f"{args.file}: invalid — {len(exc.issues)} error(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    print(_summary(config, args.file))
    return EXIT_OK


def _load_or_exit(path: str) -> Config | int:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid — {len(exc.issues)} error(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    if isinstance(config, int):
        return config
    from edgeos.app import run_forever
    from edgeos.logs import setup_logging

    setup_logging(args.log_format or config.logging.format, args.log_level or config.logging.level)
    return run_forever(config, config_path=Path(args.config))


def _control_socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    config = _load_or_exit(args.config)
    if isinstance(config, int):
        raise SystemExit(config)
    sock = config.control.socket
    return sock if sock.is_absolute() else config.device.state_dir / sock


def _ask(args: argparse.Namespace, op: str, **params: Any) -> Any:
    from edgeos.control import ControlError, request

    try:
        return request(_control_socket(args), op, **params)
    except ControlError as exc:
        print(f"edgeos: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from exc


def _cmd_status(args: argparse.Namespace) -> int:
    doc = _ask(args, "status")
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    from rich.console import Console

    from edgeos.status_view import render_status

    assert isinstance(doc, dict)
    Console().print(render_status(doc))
    return EXIT_OK


#: How much longer than ``twin set --wait`` the CLI waits for the runtime's answer.
_ANSWER_MARGIN_S = 5.0


def outcome_text(status: str | None, reason: str | None) -> str:
    """``applied``, ``refused: <reason>``, ``timed out: <reason>``, ``pending`` (for people)."""
    text = (status or "pending").replace("_", " ")
    return f"{text}: {reason}" if reason else text


def twin_row_text(row: dict[str, Any]) -> str:
    """One line of ``edgeos twin get``: value, unit, quality, and the last desired change with
    its outcome (a refused ``desired=9999`` must not read like a pending one)."""
    shown = row.get("value")
    if isinstance(shown, float):
        # Every decimal digit a float64 holds (15, DBL_DIG): "%g" showed 1999999990 as 2e+09
        # and -123456.789 as -123457. Not repr(): a scaled register (604 × 0.1) would show its
        # binary noise, 60.400000000000006, where the tag's value is 60.4.
        shown = f"{shown:.15g}"
    extra = ""
    if row.get("desired") is not None:
        outcome = outcome_text(row.get("desired_status"), row.get("desired_reason"))
        extra = f"  desired={row['desired']} v{row.get('version', '?')} ({outcome})"
    return (
        f"{row['name']:<40} {shown!s:>14} {row.get('unit', ''):<6} {row.get('quality', '')}{extra}"
    )


def _cmd_twin(args: argparse.Namespace) -> int:
    if args.twin_command == "get":
        rows = _ask(args, "twin.get", pattern=args.pattern)
        assert isinstance(rows, list)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return EXIT_OK
        for row in rows:
            print(twin_row_text(row))
        return EXIT_OK
    value: object = args.value
    for cast in (int, float):
        try:
            value = cast(args.value)
            break
        except ValueError:
            continue
    if args.value.lower() in ("true", "false"):
        value = args.value.lower() == "true"
    # The runtime answers once the change has an outcome (at most --wait s): the socket must
    # outlast that wait, not the default request timeout.
    change = _ask(
        args,
        "twin.set",
        tag=args.tag,
        value=value,
        wait_s=args.wait,
        timeout_s=args.wait + _ANSWER_MARGIN_S,
    )
    assert isinstance(change, dict)
    outcome = outcome_text(change["status"], change["reason"])
    print(f"{change['name']} v{change['version']}: {outcome}")
    return EXIT_OK if change["status"] == "applied" else EXIT_FAILURE


def _cmd_learning(args: argparse.Namespace) -> int:
    event = _ask(args, "inference.learning", enabled=args.state == "on", who=args.who)
    print(f"learned actions {'on' if event.get('enabled', args.state == 'on') else 'off'}: {event}")
    return EXIT_OK


def _cmd_debug_memory(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"top": args.top}
    if args.dump:
        params["dump"] = str(Path(args.dump).resolve())
    doc = _ask(args, "debug.memory", timeout_s=120.0, **params)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    p = doc["process"]
    print(
        f"RSS {p['rss_mb']} MB (peak {p['rss_peak_mb']}, anonymous {p['anon_mb']}), "
        f"{p['py_blocks']} Python blocks, {p['threads']} threads, {p['open_files']} open files"
    )
    if "tracked_objects" in doc["gc"]:
        print(f"{doc['gc']['tracked_objects']} objects tracked by gc; most numerous types:")
        for name, count in doc.get("types", []):
            print(f"  {count:>9}  {name}")
    tm = doc["tracemalloc"]
    if tm["tracing"]:
        print(f"tracemalloc: {tm['current_mb']} MB traced (peak {tm['peak_mb']})")
        for row in tm.get("top", []):
            print(f"  {row['kb']:>9} KiB {row['count']:>8}  {row['where']}")
        if "dumped" in tm:
            print(f"snapshot written to {tm['dumped']} (compare: python -m edgeos.memory A B)")
    else:
        print("tracemalloc: off (start the runtime with PYTHONTRACEMALLOC=1 to see sites)")
    return EXIT_OK


def _cmd_provision(args: argparse.Namespace) -> int:
    from edgeos.errors import ProvisioningError
    from edgeos.provision import install_bundle

    try:
        installed = install_bundle(args.file, args.target, overwrite=args.force)
    except ProvisioningError as exc:
        print(f"edgeos provision: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"installed credentials for device {installed.device} in {args.target}")
    print("point [uplink] key_file and [uplink.tls] at these files (see docs/receiver.md)")
    return EXIT_OK


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="/etc/edgeos/edgeos.toml", help="runtime configuration")
    p.add_argument("--socket", help="control socket (default: from the configuration)")


def _cmd_install_service(args: argparse.Namespace) -> int:
    from edgeos.service import install_service

    report = install_service(
        Path(args.root),
        config_template=Path(args.config_template) if args.config_template else None,
        enable=not args.no_enable,
        run_tools=not args.no_tools,
    )
    for path in report.written:
        print(f"wrote  {path}")
    for path in report.kept:
        print(f"kept   {path} (exists; not overwritten)")
    for note in report.notes:
        print(f"note   {note}", file=sys.stderr)
    return EXIT_OK


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeos",
        description="Firmware-style runtime for industrial gateways: reads machines over "
        "Modbus and OPC UA, keeps a digital twin, judges every cycle on-device and ships "
        "encrypted batches that are never lost.",
    )
    parser.add_argument("--version", action="version", version=f"edgeos {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", help="TOML configuration file")
    check.add_argument(
        "--no-drivers",
        action="store_true",
        help="skip validating driver options against the installed drivers",
    )
    check.set_defaults(func=_cmd_check_config)

    run = sub.add_parser("run", help="run the gateway runtime (foreground; systemd runs this)")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument("--log-format", choices=["plain", "json"], help="override logging.format")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="one-screen status of the running runtime")
    _add_target(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)

    twin = sub.add_parser("twin", help="read or set tags of the running runtime's twin")
    twin_sub = twin.add_subparsers(dest="twin_command", required=True)
    get = twin_sub.add_parser("get", help="tags matching a glob pattern")
    get.add_argument("pattern", nargs="?", default="*")
    get.add_argument("--json", action="store_true")
    _add_target(get)
    tset = twin_sub.add_parser("set", help="request a value for a writable tag")
    tset.add_argument("tag")
    tset.add_argument("value")
    tset.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the outcome")
    _add_target(tset)
    twin.set_defaults(func=_cmd_twin)

    learning = sub.add_parser(
        "learning", help="operator switch: learned set-point actions on/off (at once)"
    )
    learning.add_argument("state", choices=["on", "off"])
    learning.add_argument("--who", default="operator", help="recorded with the switch event")
    _add_target(learning)
    learning.set_defaults(func=_cmd_learning)

    debug = sub.add_parser("debug", help="diagnostics of the running runtime")
    debug_sub = debug.add_subparsers(dest="debug_command", required=True)
    mem = debug_sub.add_parser(
        "memory", help="RSS, heap objects by type, tracemalloc sites (stalls the loop briefly)"
    )
    mem.add_argument("--top", type=int, default=20, help="how many types/sites to list")
    mem.add_argument("--dump", help="write a tracemalloc snapshot here (needs PYTHONTRACEMALLOC)")
    mem.add_argument("--json", action="store_true")
    _add_target(mem)
    debug.set_defaults(func=_cmd_debug_memory)

    prov = sub.add_parser("provision", help="install a credential bundle from edgeos-receiver")
    prov.add_argument("file", help="bundle written by `edgeos-receiver device add`")
    prov.add_argument(
        "--target", default="/etc/edgeos/credentials", help="where to install (mode 0700)"
    )
    prov.add_argument("--force", action="store_true", help="replace existing credentials")
    prov.set_defaults(func=_cmd_provision)

    install = sub.add_parser(
        "install-service", help="install units, user, directories and the default config"
    )
    install.add_argument("--root", default="/", help="target root filesystem (default: /)")
    install.add_argument("--config-template", help="config to install when none exists")
    install.add_argument("--no-enable", action="store_true", help="do not enable the unit")
    install.add_argument(
        "--no-tools", action="store_true", help="do not run systemd-sysusers/systemd-tmpfiles"
    )
    install.set_defaults(func=_cmd_install_service)

    for name, (_, _, help_text, _) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for name, ep in sorted(_plugin_commands().items()):
        if name not in _DELEGATED:
            sub.add_parser(name, help=f"(from {_dist_name(ep)})", add_help=False)
    return parser


#: Commands other distributions add to ``edgeos`` (entry-point group ``edgeos.commands``): the
#: simulator and the demo come with ``edgeos-sim``, never with the gateway itself. Each entry
#: point names a ``main(argv) -> int``.
COMMANDS_GROUP = "edgeos.commands"
_OPTIONAL = {
    "sim": "the simulated tyre line",
    "demo": "the local demo (simulated line, broker, cloud receiver and runtime)",
}


def _plugin_commands() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "a plug-in"


def _run_plugin(name: str, argv: list[str]) -> int:
    ep = _plugin_commands().get(name)
    if ep is None:
        print(
            f"edgeos {name}: {_OPTIONAL[name]} is not installed on this machine; it comes with "
            "the edgeos-sim distribution (pip install ./sim, or `make demo` in a checkout)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    func: Callable[[list[str]], int] = ep.load()
    return func(argv)


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in _DELEGATED:
        module_name, func_name, _, keep = _DELEGATED[args_list[0]]
        func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
        return func(args_list if keep else args_list[1:])
    if args_list and (args_list[0] in _OPTIONAL or args_list[0] in _plugin_commands()):
        return _run_plugin(args_list[0], args_list[1:])
    parser = _build_parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
