"""``edgeos sim``: run a simulated tyre line until SIGINT/SIGTERM.

Prints the endpoints once the servers listen (human text, or one JSON object with
``--json`` so scripts and the HIL rig can read the ports back), then serves until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from edgeos_protocol.pipes import quiet_on_closed_pipe
from edgeos_sim.servers import SimLine, SimOptions

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeos sim",
        description="Serve a simulated tyre-curing line over Modbus TCP and OPC UA.",
    )
    p.add_argument("--nests", type=int, default=80, help="curing presses (default 80)")
    p.add_argument("--tags-per-nest", type=int, default=200, help="tags per press (default 200)")
    p.add_argument("--layout", choices=("flat", "unit-per-nest"), default="flat")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--modbus-port", type=int, default=5020, help="0 picks a free port")
    p.add_argument("--opcua-port", type=int, default=4840, help="0 picks a free port")
    p.add_argument("--no-opcua", action="store_true", help="serve Modbus only")
    p.add_argument(
        "--opcua-tags",
        choices=("all", "key"),
        default="all",
        help="OPC UA variables: every tag, or the process tags only (starts faster)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tick-hz", type=float, default=10.0, help="physics ticks per second")
    p.add_argument("--cycle-s", type=float, default=40.0, help="nominal press cycle (s)")
    p.add_argument("--policy", choices=("default", "optimal"), default="default")
    m = p.add_argument_group(
        "raw material",
        "a batch's hidden property p ~ N(mean, std²) moves the best recipe (the plant's usual "
        "compound: N(0, 1)); the lab Mooney served is 50 + 6p (+ offset)",
    )
    m.add_argument("--material-mean", type=float, default=0.0)
    m.add_argument("--material-std", type=float, default=1.0)
    m.add_argument(
        "--mooney-offset", type=float, default=0.0, help="added to the served batch.mooney"
    )
    m.add_argument(
        "--material-change-after-s",
        type=float,
        default=None,
        metavar="S",
        help="switch to a new rubber after S simulated seconds (a new batch starts then)",
    )
    m.add_argument("--material-mean-after", type=float, default=0.0)
    m.add_argument("--material-std-after", type=float, default=1.0)
    m.add_argument("--mooney-offset-after", type=float, default=0.0)
    p.add_argument("--truth", type=Path, default=None, help="record every served value here")
    p.add_argument("--json", action="store_true", help="print the endpoints as one JSON object")
    return p


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edgeos sim``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.tick_hz <= 0:
        print("edgeos sim: --tick-hz must be positive", file=sys.stderr)
        return 2
    if args.material_std < 0 or args.material_std_after < 0:
        print("edgeos sim: --material-std(-after) must be >= 0", file=sys.stderr)
        return 2
    options = SimOptions(
        nests=args.nests,
        tags_per_nest=args.tags_per_nest,
        layout=args.layout,
        host=args.host,
        modbus_port=args.modbus_port,
        opcua_port=None if args.no_opcua else args.opcua_port,
        opcua_tags=args.opcua_tags,
        seed=args.seed,
        tick_hz=args.tick_hz,
        cycle_s=args.cycle_s,
        policy=args.policy,
        truth_path=args.truth,
        material_mean=args.material_mean,
        material_std=args.material_std,
        mooney_offset=args.mooney_offset,
        material_change_after_s=args.material_change_after_s,
        material_mean_after=args.material_mean_after,
        material_std_after=args.material_std_after,
        mooney_offset_after=args.mooney_offset_after,
    )
    try:
        return asyncio.run(_serve(options, as_json=args.json))
    except BrokenPipeError:
        raise  # the reader went away: quiet_on_closed_pipe ends quietly
    except (ValueError, OSError) as exc:
        print(f"edgeos sim: {exc}", file=sys.stderr)
        return 1


async def _serve(options: SimOptions, *, as_json: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with SimLine(options) as line:
            info = {
                "modbus": (
                    {"host": options.host, "port": line.modbus_port}
                    if line.modbus_port is not None
                    else None
                ),
                "opcua_url": line.opcua_url,
                "nests": line.layout.nests,
                "tags_per_nest": line.layout.tags_per_nest,
                "tags": line.layout.size,
                "layout": line.layout.mode,
                "truth": str(options.truth_path) if options.truth_path else None,
                "material": {
                    "mean": options.material_mean,
                    "std": options.material_std,
                    "mooney_offset": options.mooney_offset,
                    "change_after_s": options.material_change_after_s,
                    "mean_after": options.material_mean_after,
                    "std_after": options.material_std_after,
                    "mooney_offset_after": options.mooney_offset_after,
                },
            }
            if as_json:
                print(json.dumps(info), flush=True)
            else:
                print(
                    f"simulated tyre line: {line.layout.nests} nests × "
                    f"{line.layout.tags_per_nest} tags = {line.layout.size} tags "
                    f"({line.layout.mode} layout)"
                )
                if line.modbus_port is not None:
                    units = line.layout.units
                    print(
                        f"  Modbus TCP  tcp://{options.host}:{line.modbus_port}  "
                        f"units {units[0]}..{units[-1]}, holding registers"
                    )
                if line.opcua_url is not None:
                    print(f"  OPC UA      {line.opcua_url}  (ns=2;s=Line/nest01/heater.sp …)")
                print("Ctrl-C to stop.", flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
