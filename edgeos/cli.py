"""The ``edgeos`` command line.

Subcommands that belong to a part (``sim``, ``bundle``, ``ota``) hand their arguments to that
part's own ``main`` so each part keeps its options next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeos import __version__
from edgeos.config import Config, load_config
from edgeos.errors import ConfigError

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# Subcommands implemented by a part: name -> (module, function, help).
_DELEGATED: dict[str, tuple[str, str, str]] = {
    "sim": ("edgeos.sim.cli", "main", "run the simulated tyre line (Modbus TCP + OPC UA)"),
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

    for name, (_, _, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in _DELEGATED:
        module_name, func_name, _ = _DELEGATED[args_list[0]]
        func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
        return func(args_list[1:])
    parser = _build_parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
