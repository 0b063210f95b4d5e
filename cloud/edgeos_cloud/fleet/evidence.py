"""Fleet evidence: every measured tyre of a group, attributed to the policy that made it.

A **policy** is what decided a tyre's recipe: the gateway's correction model version (the
champion in force when the tyre was loaded) × the configuration profile in force
(reported in the gateway's ``config_summary``). Everything comes from what the gateways
already send, read through the receiver's storage query API (SQLite and PostgreSQL alike):

* ``guard_decision`` (at load: action, the guard's conservative default-policy estimate
  ``default_upper``) and ``guard_settled`` (the measured modulus of that tyre): the realised
  reward ``r = E* − |e − E*|`` and the default policy's reward ``d`` for the same tyre, exactly
  as the gateway's α-budget counts it (realised when the default recipe ran, the upper bound
  otherwise) — so ``r − d`` is a conservative per-tyre uplift over the default policy;
* ``verdict`` (at cure end: continue/correct/scrap, predicted modulus, quality model version):
  the gate's error against the realised modulus, scrap and correction rates;
* ``fleet_fingerprint`` (its ``versions``), ``model_loaded``/``model_promoted``,
  ``profile_applied`` and ``config_summary`` (its
  ``profile``: name and version in force, or none): the versions in force over time;
* the samples ``<station>.batch.id`` and ``<station>.batch.mooney`` at the load: the
  raw-material batch and its lab Mooney (the strata; see :mod:`.competition`).

:func:`leaderboard` aggregates the tyres per group into one row per policy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeos_cloud.fleet.physics.recipe import ELASTICITY_MAX, ELASTICITY_MIN
from edgeos_protocol.fleet import FINGERPRINT_EVENT, PROFILE_EVENT
from edgeos_protocol.profile import EVENT_TYPE as SUMMARY_EVENT

__all__ = [
    "NO_PROFILE",
    "PolicyRow",
    "Tyre",
    "leaderboard",
    "load_tyres",
    "material_class",
    "policy_key",
    "split_policy",
    "stratum_of",
    "tyres_of_device",
]

#: Profile of a gateway that has never reported one (the configuration it shipped with).
NO_PROFILE = "-"
#: Task whose champion decides recipes (the guard's correction model).
ACTING_TASK = "correction"


def policy_key(model: str, profile: str) -> str:
    """``<model key>|<profile key>``, e.g. ``correction@1.0.0|press@3`` (``-``: none)."""
    return f"{model or NO_PROFILE}|{profile or NO_PROFILE}"


def split_policy(key: str) -> tuple[str, str]:
    model, _, profile = key.partition("|")
    return model, profile or NO_PROFILE


@dataclass(frozen=True, slots=True)
class Tyre:
    """One measured tyre with the policy, material and gate verdict it belongs to."""

    device: str
    station: str
    #: When it was loaded (the guard's decision), µs since the epoch.
    ts_us: int
    model: str
    profile: str
    action: str
    elasticity: float
    reward: float
    #: The default policy's reward for this tyre, as the gateway's budget counts it.
    default_reward: float
    batch: int | None = None
    mooney: float | None = None
    verdict: str | None = None
    predicted: float | None = None
    quality_model: str | None = None

    @property
    def policy(self) -> str:
        return policy_key(self.model, self.profile)

    @property
    def in_spec(self) -> bool:
        return ELASTICITY_MIN <= self.elasticity <= ELASTICITY_MAX


@dataclass(slots=True)
class _Decision:
    ts_us: int
    action: str
    default_upper: float
    model: str
    profile: str
    quality_model: str | None
    verdict: tuple[str, float, str] | None = None


def _profile_of(in_force: Any) -> str:
    """``name@version`` of a ``config_summary``'s profile in force (``-``: none)."""
    if isinstance(in_force, Mapping) and "name" in in_force and "version" in in_force:
        return f"{in_force['name']}@{in_force['version']}"
    return NO_PROFILE


def _reward(e: float, target: float) -> float:
    return target - abs(e - target)


def _material_series(storage: Any, device: str) -> dict[tuple[str, str], tuple[Any, Any]]:
    """(station, "batch.id"|"batch.mooney") → (times µs, values) from the stored samples."""
    raw: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for row in storage.query_samples(device):
        station, _, suffix = row.tag.partition(".")
        if suffix not in ("batch.id", "batch.mooney") or not isinstance(row.value, float | int):
            continue
        ts, vals = raw.setdefault((station, suffix), ([], []))
        ts.append(row.ts_us)
        vals.append(float(row.value))
    return {k: (np.asarray(t, np.int64), np.asarray(v)) for k, (t, v) in raw.items()}


def _at(series: Mapping[tuple[str, str], tuple[Any, Any]], key: tuple[str, str], ts: int) -> Any:
    got = series.get(key)
    if got is None:
        return None
    t, v = got
    i = int(np.searchsorted(t, ts, side="right")) - 1
    return None if i < 0 else float(v[i])


def tyres_of_device(
    storage: Any,
    device: str,
    *,
    target: float = 6.6,
    since_us: int | None = None,
    with_material: bool = True,
) -> list[Tyre]:
    """Every settled tyre of ``device`` (see the module docstring)."""
    champions: dict[str, str] = {}
    profile = NO_PROFILE
    pending: dict[str, _Decision] = {}
    out: list[_Pre] = []
    # Versions in force are replayed from the start, whatever ``since_us`` is.
    for ev in storage.events(device):
        kind = ev.get("type")
        ts = int(ev["ts_us"])
        if kind == FINGERPRINT_EVENT and isinstance(ev.get("versions"), Mapping):
            champions.update({str(k): str(v) for k, v in ev["versions"].items()})
        elif (kind == "model_loaded" and ev.get("role") == "champion") or kind == "model_promoted":
            champions[str(ev.get("task"))] = f"{ev.get('model')}@{ev.get('version')}"
        elif kind == PROFILE_EVENT:
            profile = str(ev.get("profile") or NO_PROFILE)
        elif kind == SUMMARY_EVENT:
            summary = ev.get("summary")
            if isinstance(summary, Mapping):
                profile = _profile_of(summary.get("profile"))
        elif since_us is not None and ts < since_us:
            continue
        elif kind == "guard_decision":
            pending[str(ev["station"])] = _Decision(
                ts,
                str(ev.get("action")),
                float(ev.get("default_upper", math.nan)),
                champions.get(ACTING_TASK, ""),
                profile,
                champions.get("quality"),
            )
        elif kind == "verdict":
            d = pending.get(str(ev.get("station")))
            if d is not None and "predicted" in ev:
                d.verdict = (
                    str(ev.get("verdict")),
                    float(ev["predicted"]),
                    f"{ev.get('model')}@{ev.get('version')}",
                )
        elif kind == "guard_settled":
            d = pending.pop(str(ev.get("station")), None)
            e = ev.get("elasticity")
            if d is None or not isinstance(e, float | int) or not math.isfinite(e):
                continue
            r = _reward(float(e), target)
            # The guard's own accounting: realised for a default tyre whose recipe was in
            # force, its upper bound for the rest.
            default_ok = d.action == "default" and ev.get("in_force") is not False
            dr = r if default_ok else d.default_upper
            out.append(
                _Pre(str(ev["station"]), d, str(ev.get("action", d.action)), float(e), r, dr)
            )
    series = _material_series(storage, device) if with_material and out else {}
    tyres = []
    for p in out:
        batch = _at(series, (p.station, "batch.id"), p.decision.ts_us)
        mooney = _at(series, (p.station, "batch.mooney"), p.decision.ts_us)
        v = p.decision.verdict
        tyres.append(
            Tyre(
                device=device,
                station=p.station,
                ts_us=p.decision.ts_us,
                model=p.decision.model,
                profile=p.decision.profile,
                action=p.action,
                elasticity=p.elasticity,
                reward=p.reward,
                default_reward=p.default_reward,
                batch=None if batch is None else round(batch),
                mooney=mooney,
                verdict=None if v is None else v[0],
                predicted=None if v is None else v[1],
                quality_model=(None if v is None else v[2]) or p.decision.quality_model,
            )
        )
    return tyres


@dataclass(frozen=True, slots=True)
class _Pre:
    station: str
    decision: _Decision
    action: str
    elasticity: float
    reward: float
    default_reward: float


def load_tyres(
    storage: Any,
    devices: Iterable[str],
    *,
    target: float = 6.6,
    since_us: int | None = None,
    with_material: bool = True,
) -> list[Tyre]:
    """:func:`tyres_of_device` over ``devices`` (a group's members), oldest first."""
    tyres = [
        t
        for d in devices
        for t in tyres_of_device(
            storage, d, target=target, since_us=since_us, with_material=with_material
        )
    ]
    tyres.sort(key=lambda t: (t.ts_us, t.device, t.station))
    return tyres


def material_class(mooney: float | None, width: float) -> str:
    """The raw-material stratum of a lab Mooney reading (``"?"`` when unknown)."""
    if mooney is None or not math.isfinite(mooney):
        return "?"
    lo = math.floor(mooney / width) * width
    return f"{lo:g}-{lo + width:g}"


def stratum_of(tyre: Tyre, strata: Sequence[str], material_bin_mu: float = 3.0) -> str:
    """The stratum key of a tyre for the given dimensions (``material``, ``device``, ``batch``)."""
    parts = []
    for dim in strata:
        if dim == "material":
            parts.append(material_class(tyre.mooney, material_bin_mu))
        elif dim == "device":
            parts.append(tyre.device)
        elif dim == "batch":
            parts.append(f"{tyre.device}#{tyre.batch}")
        else:
            raise ValueError(f"unknown stratum dimension {dim!r}")
    return "/".join(parts)


@dataclass(slots=True)
class PolicyRow:
    """One line of a group's leaderboard."""

    group: str
    policy: str
    model: str
    profile: str
    tyres: int
    devices: list[str]
    batches: int
    mean_reward: float
    reward_se: float
    #: Mean reward re-weighted to the group's raw-material mix (direct standardisation).
    adjusted_reward: float
    #: Mean of ``r − d`` per tyre: realised reward over the default policy's (conservative).
    uplift_vs_default: float
    learned_share: float
    gate_error: float | None
    scrap_rate: float | None
    correction_rate: float | None
    reject_rate: float
    strata: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, 5)

        return {
            "group": self.group,
            "policy": self.policy,
            "model": self.model,
            "profile": self.profile,
            "tyres": self.tyres,
            "devices": self.devices,
            "batches": self.batches,
            "mean_reward": r(self.mean_reward),
            "reward_se": r(self.reward_se),
            "adjusted_reward": r(self.adjusted_reward),
            "uplift_vs_default": r(self.uplift_vs_default),
            "learned_share": r(self.learned_share),
            "gate_error": r(self.gate_error),
            "scrap_rate": r(self.scrap_rate),
            "correction_rate": r(self.correction_rate),
            "reject_rate": r(self.reject_rate),
            "strata": dict(self.strata),
        }


def leaderboard(
    group: str,
    tyres: Sequence[Tyre],
    *,
    material_bin_mu: float = 3.0,
) -> list[PolicyRow]:
    """One row per policy, best ``adjusted_reward`` first."""
    by_policy: dict[str, list[Tyre]] = defaultdict(list)
    for t in tyres:
        by_policy[t.policy].append(t)
    mix: dict[str, int] = defaultdict(int)
    for t in tyres:
        mix[material_class(t.mooney, material_bin_mu)] += 1
    rows = []
    for key, ts in by_policy.items():
        rewards = np.array([t.reward for t in ts])
        uplift = np.array([t.reward - t.default_reward for t in ts])
        per_class: dict[str, list[float]] = defaultdict(list)
        for t in ts:
            per_class[material_class(t.mooney, material_bin_mu)].append(t.reward)
        weight = sum(mix[c] for c in per_class)
        adjusted = sum(mix[c] * float(np.mean(v)) for c, v in per_class.items()) / weight
        judged = [t for t in ts if t.verdict is not None and t.predicted is not None]
        model, profile = split_policy(key)
        rows.append(
            PolicyRow(
                group=group,
                policy=key,
                model=model,
                profile=profile,
                tyres=len(ts),
                devices=sorted({t.device for t in ts}),
                batches=len({(t.device, t.batch) for t in ts}),
                mean_reward=float(rewards.mean()),
                reward_se=float(rewards.std(ddof=1) / math.sqrt(len(ts))) if len(ts) > 1 else 0.0,
                adjusted_reward=adjusted,
                uplift_vs_default=float(np.nanmean(uplift)) if np.isfinite(uplift).any() else 0.0,
                learned_share=sum(t.action == "learned" for t in ts) / len(ts),
                gate_error=(
                    float(np.mean([abs(t.elasticity - (t.predicted or 0.0)) for t in judged]))
                    if judged
                    else None
                ),
                scrap_rate=(sum(t.verdict == "scrap" for t in judged) / len(judged))
                if judged
                else None,
                correction_rate=(sum(t.verdict == "correct" for t in judged) / len(judged))
                if judged
                else None,
                reject_rate=sum(not t.in_spec for t in ts) / len(ts),
                strata={c: len(v) for c, v in sorted(per_class.items())},
            )
        )
    rows.sort(key=lambda r: -r.adjusted_reward)
    return rows
