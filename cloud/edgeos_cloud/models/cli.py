"""``edgeos-cloud models …``: the model lifecycle from the command line.

    edgeos-cloud models --config models.toml list [--json]
    edgeos-cloud models --config models.toml show quality@1.2.0 [--json]
    edgeos-cloud models --config models.toml register DIR_OR_MANIFEST [--group G --champion]
    edgeos-cloud models --config models.toml gate quality@1.2.0 --group G
    edgeos-cloud models --config models.toml retrain --task quality|anomaly|correction --group G
                                                      [--since T] [--until T] [--epochs N]
    edgeos-cloud models --config models.toml publish quality@1.2.0 --group G
    edgeos-cloud models --config models.toml rollback --task TASK --group G
    edgeos-cloud models --config models.toml drift --task quality --group G [--retrain] [--since T]
    edgeos-cloud models --config models.toml reports --group G   # fold device reports: tracking,
                                                                 # per-device audit, stages,
                                                                 # and the OTA campaigns' reports
    edgeos-cloud models --config models.toml campaigns           # only the campaigns' reports
    edgeos-cloud models --config models.toml metrics

Exit status: 0 done, 1 refused (the gate or publishing said no; the reason is printed),
2 usage or configuration error, 3 deferred (database or registry down, too little data).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeos_cloud.models.errors import (
    DataUnavailable,
    LifecycleError,
    RegistryUnavailable,
    TrainingFailed,
    VersionRefused,
    WindowRefused,
)
from edgeos_cloud.timefmt import optional_time

__all__ = ["load_config", "models_main"]

_TASKS = ("quality", "anomaly", "correction")


def load_config(path: Path) -> Any:
    from edgeos_cloud.models.lifecycle import LifecycleConfig

    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    base = path.resolve().parent
    for key in ("home", "ota_repo"):
        if key in raw and not Path(raw[key]).is_absolute():
            raw[key] = str(base / raw[key])
    return LifecycleConfig.model_validate(raw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeos-cloud models", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("models.toml"))
    p.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered versions and their stages")
    show = sub.add_parser("show", help="one version, its gate report and audit trail")
    show.add_argument("key", help="name@manifest_version or name/number")
    reg = sub.add_parser("register", help="register a model folder or a committed manifest")
    reg.add_argument("path", type=Path)
    reg.add_argument("--group")
    reg.add_argument("--champion", action="store_true", help="seed it as the group's champion")
    gate = sub.add_parser("gate", help="run the quality gate on a version")
    gate.add_argument("key")
    gate.add_argument("--group", required=True)
    gate.add_argument("--since")
    rt = sub.add_parser("retrain", help="train a candidate from the group's stored data")
    rt.add_argument("--task", default="quality", choices=_TASKS)
    rt.add_argument("--group", required=True)
    rt.add_argument("--since")
    rt.add_argument("--until")
    rt.add_argument("--epochs", type=int)
    pub = sub.add_parser("publish", help="send a qualified version to a group as challenger")
    pub.add_argument("key")
    pub.add_argument("--group", required=True)
    rb = sub.add_parser("rollback", help="re-publish the previous champion as a new version")
    rb.add_argument("--task", default="quality", choices=_TASKS)
    rb.add_argument("--group", required=True)
    dr = sub.add_parser("drift", help="realised error per window; --retrain acts on drift")
    dr.add_argument("--task", default="quality")
    dr.add_argument("--group", required=True)
    dr.add_argument("--retrain", action="store_true")
    dr.add_argument("--since", help="a one-off check from this time (not incremental)")
    rep = sub.add_parser(
        "reports", help="fold the group's model reports: tracking, per-device audit, stages"
    )
    rep.add_argument("--group", required=True)
    sub.add_parser(
        "campaigns", help="fold the OTA campaigns' device reports into the registry's audit"
    )
    sub.add_parser("metrics", help="Prometheus text exposition of every version per group")
    return p


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    if isinstance(obj, list):
        for item in obj:
            print(
                "  ".join(
                    f"{item.get(k)}"
                    for k in ("key", "version", "status", "stages", "campaign_halted", "gate")
                    if k in item
                )
            )
        return
    print(json.dumps(obj, indent=2, default=str))


def models_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from edgeos_cloud.models.campaigns import installs
        from edgeos_cloud.models.lifecycle import Lifecycle

        config = load_config(args.config)
        life = Lifecycle(config)
        out: Any
        if args.command == "list":
            out = [v.as_dict() for v in life.registry.versions()]
        elif args.command == "show":
            v = life.registry.find(args.key)
            out = v.as_dict() | {
                "gate_report": life.registry.gate_report(v),
                "audit": [a for a in life.registry.audit(v.name) if a["key"] == v.key],
                "installs": installs(life, v),
            }
        elif args.command == "register":
            if args.champion:
                if not args.group:
                    raise ValueError("--champion needs --group")
                out = life.seed_champion(args.path, args.group).as_dict()
            elif args.path.is_dir():
                out = life.register_dir(args.path).as_dict()
            else:
                out = life.register_manifest(args.path).as_dict()
        elif args.command == "gate":
            v, report = life.gate(
                life.registry.find(args.key), args.group, since_us=optional_time(args.since)
            )
            out = report.as_dict()
            _print(out, args.json)
            return 0 if report.passed else 1
        elif args.command == "retrain":
            out = life.retrain(
                args.task,
                args.group,
                since_us=optional_time(args.since),
                until_us=optional_time(args.until),
                epochs=args.epochs,
            )
            _print(out, args.json)
            return 0 if out["gate"]["passed"] else 1
        elif args.command == "publish":
            out = life.publish(life.registry.find(args.key), args.group)
        elif args.command == "rollback":
            out = life.rollback(args.task, args.group)
        elif args.command == "drift":
            if args.retrain:
                out = life.drift_and_retrain(args.task, args.group)
            else:
                out = life.drift(args.task, args.group, since_us=optional_time(args.since))
        elif args.command == "metrics":
            from edgeos_cloud.models.metrics import render

            sys.stdout.write(render(life).decode())
            return 0
        elif args.command == "campaigns":
            out = life.record_campaign_reports()
        else:
            # Campaigns first: they need only the registry, the events need the database too.
            campaigns = life.record_campaign_reports()
            out = life.track(args.group) | {"campaigns": campaigns}
        _print(out, args.json)
        return 0
    except (DataUnavailable, RegistryUnavailable) as exc:
        print(f"deferred: {exc}", file=sys.stderr)
        return 3
    except (VersionRefused, TrainingFailed, WindowRefused, LifecycleError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError, ValidationError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
