"""``edgeos-cloud fleet …``: similarity groups, the leaderboard, competitions, rollouts.

    edgeos-cloud fleet --config fleet.toml [--json] groups
    edgeos-cloud fleet … leaderboard [--group G] [--since T]
    edgeos-cloud fleet … decide --group G --champion POLICY [--challenger POLICY …]
    edgeos-cloud fleet … competitions [--group G]     # the rule's records and the screenings
    edgeos-cloud fleet … calibrate --group G            # the group's twin simulator
    edgeos-cloud fleet … screen --group G NAME=heater.sp:164.5 NAME=press.sp:16.6 [--combine]
    edgeos-cloud fleet … rollouts [--json]
    edgeos-cloud fleet … run-once --group G --champion POLICY [--challenger POLICY …]
                         [--canary DEVICE …] [--models-config models.toml]  # the loop's step
                         [--no-screen] [--runner-up-confidence C]
    edgeos-cloud fleet … metrics                         # Prometheus text (docs/grafana/)

A POLICY is ``<model key>|<profile key>`` as the leaderboard prints it. Exit status: 0 done,
1 refused, 2 usage or configuration error, 3 deferred (database down, too little data, no OTA
repository configured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeos_cloud.fleet.config import FleetConfig, load_fleet_config
from edgeos_cloud.timefmt import optional_time
from edgeos_protocol.errors import ConfigError

__all__ = ["fleet_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeos-cloud fleet", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("fleet.toml"))
    p.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("groups", help="similarity groups and their members")
    lb = sub.add_parser("leaderboard", help="policies per group: reward, uplift, gate error")
    lb.add_argument("--group")
    lb.add_argument("--since")
    de = sub.add_parser("decide", help="run the competition rule for a group")
    de.add_argument("--group", required=True)
    de.add_argument("--champion", required=True)
    de.add_argument("--challenger", action="append")
    de.add_argument("--since")
    co = sub.add_parser("competitions", help="recorded competitions")
    co.add_argument("--group")
    ca = sub.add_parser("calibrate", help="fit the group's twin simulator from stored data")
    ca.add_argument("--group", required=True)
    sc = sub.add_parser("screen", help="screen candidate recipes in the group's twin")
    sc.add_argument("--group", required=True)
    sc.add_argument("candidates", nargs="+", help="NAME=suffix:value[,suffix:value]")
    sc.add_argument("--combine", action="store_true", help="two candidates and their union")
    ro = sub.add_parser("rollouts", help="rollouts of winners (canary, group, halted)")
    ro.add_argument("--json", action="store_true", dest="json_here", help="print JSON")
    ru = sub.add_parser("run-once", help="watch a rollout, or decide and roll out a winner")
    ru.add_argument("--group", required=True)
    ru.add_argument("--champion", required=True)
    ru.add_argument("--challenger", action="append")
    ru.add_argument("--canary", action="append")
    ru.add_argument("--hardware")
    ru.add_argument("--min-tyres", type=int, default=20, help="canary tyres before advancing")
    ru.add_argument("--alpha", type=float, default=0.005, help="the gateways' guard α")
    ru.add_argument("--models-config", type=Path, help="models.toml: for a model winner")
    ru.add_argument(
        "--no-screen",
        action="store_true",
        help="do not screen combinations of profile winners in the twin",
    )
    ru.add_argument(
        "--runner-up-confidence",
        type=float,
        default=0.8,
        help="a tie at least this confident is combined with the winner",
    )
    sub.add_parser("metrics", help="Prometheus text exposition of the leaderboard")
    return p


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    if isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                print("  ".join(f"{k}={v}" for k, v in item.items() if not isinstance(v, dict)))
            else:
                print(item)
        return
    print(json.dumps(obj, indent=2, default=str))


def _storage(config: FleetConfig) -> Any:
    from edgeos_cloud.receiver.storage import open_storage

    return open_storage(config.storage_url)


class _Deferred(Exception):
    pass


def fleet_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_fleet_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edgeos-cloud fleet: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "rollouts":
            return _rollouts(config, args.json or args.json_here)
        if args.command == "competitions":
            return _competitions(config, args)
        if args.command == "screen":
            return _screen(config, args)
        storage = _storage(config)
    except _Deferred as exc:
        print(f"deferred: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # the database is down or unreachable: try again later
        print(f"deferred: receiver database: {exc}", file=sys.stderr)
        return 3
    try:
        return _with_storage(config, storage, args)
    except _Deferred as exc:
        print(f"deferred: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"edgeos-cloud fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        storage.close()


def _with_storage(config: FleetConfig, storage: Any, args: argparse.Namespace) -> int:
    from edgeos_cloud.fleet.evidence import leaderboard, load_tyres
    from edgeos_cloud.fleet.groups import GroupDirectory

    directory = GroupDirectory(storage, config)
    if args.command == "groups":
        doc = {
            "groups": [g.as_dict() for g in directory.groups()],
            "ungrouped": directory.ungrouped(),
        }
        _print(doc if args.json else doc["groups"], args.json)
        return 0
    since = optional_time(getattr(args, "since", None))
    bin_mu = config.competition.material_bin_mu

    def rows_of(group: str) -> list[Any]:
        tyres = load_tyres(storage, directory.members(group), target=config.target, since_us=since)
        return leaderboard(group, tyres, material_bin_mu=bin_mu)

    if args.command == "leaderboard":
        groups = [args.group] if args.group else directory.group_names()
        _print([r.as_dict() for g in groups for r in rows_of(g)], args.json)
        return 0
    if args.command == "metrics":
        from edgeos_cloud.fleet.competition import CompetitionStore
        from edgeos_cloud.fleet.metrics import render

        groups = directory.group_names()
        with CompetitionStore(config.home / "competitions.db") as store:
            text = render(
                [r for g in groups for r in rows_of(g)],
                store.list(),
                {g: len(directory.members(g)) for g in groups},
            )
        sys.stdout.write(text.decode())
        return 0
    if args.command == "decide":
        from edgeos_cloud.fleet.competition import CompetitionStore, decide

        tyres = load_tyres(
            storage, directory.members(args.group), target=config.target, since_us=since
        )
        with CompetitionStore(config.home / "competitions.db") as store:
            winner = decide(
                args.group,
                args.champion,
                tyres,
                config.competition,
                challengers=args.challenger,
                store=store,
            )
            records = [c.as_dict() for c in store.list(args.group)][-len(args.challenger or [1]) :]
        _print(
            {"winner": None if winner is None else winner.as_dict(), "competitions": records},
            args.json,
        )
        return 0
    if args.command == "run-once":
        return _run_once(config, storage, args)
    if args.command == "calibrate":
        from edgeos_cloud.fleet.twinsim import calibrate_from_storage

        members = directory.members(args.group)
        if not members:
            raise _Deferred(f"group {args.group!r} has no members")
        _print(calibrate_from_storage(config.storage_url, members).as_dict(), args.json)
        return 0
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects the rest


def _competitions(config: FleetConfig, args: argparse.Namespace) -> int:
    from edgeos_cloud.fleet.competition import CompetitionStore

    path = config.home / "competitions.db"
    if not path.exists():
        _print([], args.json)
        return 0
    with CompetitionStore(path) as store:
        records = [c.as_dict() for c in store.list(args.group)]
    _print(records, args.json)
    if not args.json:
        for c in records:
            if c["screening"] and c["screening"].get("results"):
                twin = ", ".join(
                    f"{r['candidate']} {r['mean_reward']:.3f}" for r in c["screening"]["results"]
                )
                print(f"  #{c['id']} screened: {twin} -> {c['screening']['rolled_out']}")
    return 0


def _candidate(spec: str) -> Any:
    from edgeos_cloud.fleet.twinsim import Candidate

    name, _, body = spec.partition("=")
    setpoints = {}
    for part in filter(None, body.split(",")):
        suffix, _, value = part.partition(":")
        setpoints[suffix] = float(value)
    if not name or not setpoints:
        raise ValueError(f"candidate {spec!r}: expected NAME=suffix:value[,suffix:value]")
    return Candidate(name, setpoints)


def _screen(config: FleetConfig, args: argparse.Namespace) -> int:
    from edgeos_cloud.fleet.competition import screen
    from edgeos_cloud.fleet.groups import GroupDirectory
    from edgeos_cloud.fleet.twinsim import Candidate, TwinSimulator, calibrate_from_storage

    try:
        candidates = [_candidate(c) for c in args.candidates]
    except ValueError as exc:
        print(f"edgeos-cloud fleet: {exc}", file=sys.stderr)
        return 2
    members = GroupDirectory.from_url(config.storage_url, config).members(args.group)
    if not members:
        raise _Deferred(f"group {args.group!r} has no members")
    params = calibrate_from_storage(config.storage_url, members, cycle_s=config.twin.cycle_s)
    twin = TwinSimulator(params, nests=config.twin.nests, seed=config.twin.seed)
    if args.combine:
        if len(candidates) != 2:
            print("edgeos-cloud fleet: --combine takes two candidates", file=sys.stderr)
            return 2
        a, b = candidates
        _print(screen(a, b, twin, cycles=config.twin.cycles).as_dict(), args.json)
        return 0
    results = twin.screen([Candidate.default(), *candidates], cycles=config.twin.cycles)
    _print([r.as_dict() for r in results], args.json)
    return 0


def _rollouts(config: FleetConfig, as_json: bool) -> int:
    if config.ota_repo is None:
        raise _Deferred("no ota_repo in [fleet]: rollouts need the TUF repository")
    from dataclasses import asdict

    from edgeos_cloud.fleet.rollout import Rollouts

    _print([asdict(r) for r in Rollouts(config.ota_repo, config.home).all()], as_json)
    return 0


def _run_once(config: FleetConfig, storage: Any, args: argparse.Namespace) -> int:
    from edgeos_cloud.fleet.loop import run_once
    from edgeos_cloud.fleet.rollout import RolloutRefused

    if config.ota_repo is None:
        raise _Deferred("no ota_repo in [fleet]: rollouts need the TUF repository")
    lifecycle = None
    if args.models_config is not None:
        from edgeos_cloud.models.cli import load_config
        from edgeos_cloud.models.lifecycle import Lifecycle

        lifecycle = Lifecycle(load_config(args.models_config))
    try:
        step = run_once(
            config,
            storage,
            args.group,
            champion=args.champion,
            challengers=args.challenger,
            canaries=args.canary,
            hardware=args.hardware,
            lifecycle=lifecycle,
            min_tyres=args.min_tyres,
            alpha=args.alpha,
            screen_combinations=not args.no_screen,
            runner_up_confidence=args.runner_up_confidence,
        )
    except RolloutRefused as exc:
        print(f"edgeos-cloud fleet: {exc}", file=sys.stderr)
        return 1
    _print(step.as_dict(), args.json)
    return 1 if step.action == "refused" else 0
