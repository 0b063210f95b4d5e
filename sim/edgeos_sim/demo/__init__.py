"""``edgeos demo``: the whole system on one machine, with a live dashboard.

One process runs a simulated tyre line (Modbus TCP and OPC UA servers on loopback), an
embedded MQTT broker (amqtt), the receiver (SQLite) with the device registered, and the
runtime with the example configuration, inference and the guard — then shows what each part
is doing, twice a second, until Ctrl-C or SIGTERM stops them all in order::

    edgeos demo                                   # until Ctrl-C
    edgeos demo --duration 25 --json             # CI: one JSON summary, exit 0 when data flowed

* :mod:`edgeos_sim.demo.runner` — start order, ordered shutdown;
* :mod:`edgeos_sim.demo.state` — options and the state directory;
* :mod:`edgeos_sim.demo.summary` — the end-to-end check and the closing report;
* :mod:`edgeos_sim.demo.dashboard` — the frame (``edgeos status`` screen + a receiver panel);
* :mod:`edgeos_sim.demo.broker` — the embedded broker.

See ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from edgeos_protocol.pipes import quiet_on_closed_pipe

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeos demo",
        description="Run a simulated tyre line, an embedded broker, the receiver and the "
        "runtime in one process, with a live dashboard. Ctrl-C stops everything.",
    )
    p.add_argument("--nests", type=int, default=8, help="curing presses (default 8)")
    p.add_argument("--tags-per-nest", type=int, default=50, help="tags per press (default 50)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("demo-state"),
        help="spool, database, keys and logs of this run (default ./demo-state; emptied on "
        "start unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the state of the previous run")
    p.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after this long"
    )
    p.add_argument(
        "--json", action="store_true", help="no dashboard: print one JSON summary at the end"
    )
    p.add_argument("--cycle-s", type=float, default=40.0, help="press cycle in seconds (40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated line")
    p.add_argument("--models", type=Path, default=None, help="folder of the model manifests")
    p.add_argument("--no-inference", action="store_true", help="run without the models")
    return p


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edgeos demo``: 0 when everything stopped cleanly and data flowed."""
    args = build_parser().parse_args(argv)
    if args.nests < 1 or args.tags_per_nest < 20:
        print("edgeos demo: --nests must be ≥ 1 and --tags-per-nest ≥ 20", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("edgeos demo: --duration must be positive", file=sys.stderr)
        return 2

    from rich.console import Console

    from edgeos.errors import EdgeosError
    from edgeos.gcpolicy import new_event_loop
    from edgeos_sim.demo.runner import DemoRun, print_error
    from edgeos_sim.demo.state import DemoError, DemoOptions
    from edgeos_sim.demo.summary import report

    options = DemoOptions(
        state_dir=args.state_dir,
        keep=args.keep,
        nests=args.nests,
        tags_per_nest=args.tags_per_nest,
        duration_s=args.duration,
        as_json=args.json,
        cycle_s=args.cycle_s,
        seed=args.seed,
        models_dir=args.models,
        inference=not args.no_inference,
    )
    console = Console()
    demo = DemoRun(options, console=console)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            summary = runner.run(demo.run())
    except DemoError as exc:
        print_error(str(exc))
        return exc.exit_code
    except BrokenPipeError:
        raise  # the reader went away: quiet_on_closed_pipe ends quietly
    except (EdgeosError, OSError) as exc:
        print_error(f"cannot run: {exc}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handler was installed
        print_error("interrupted")
        return 130
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        report(summary, console)
    return 0 if summary.get("ok") else 1
