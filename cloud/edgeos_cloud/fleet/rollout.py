"""Rolling a winner out to its similarity group: canary first, automatic halt and rollback.

A winner is either a model version (it reaches gateways as a *challenger* in a ``models``
bundle, so each gateway's own champion/challenger rule and α-budget guard still protect its
line) or a configuration profile (a ``config`` bundle: health-gated trial, automatic rollback
on the gateway). A rollout is one staged :class:`~edgeos_cloud.ota.campaign.Campaign`:

1. ``canary`` — the canary gateways' channels (a canary needs an ``[ota] group`` of its own,
   else the stage would reach its neighbours too; refused otherwise);
2. ``group`` — every other member's channel.

:meth:`Rollouts.step` watches the canaries: the authenticated OTA reports the campaign holds
(``rolled_back``/``rejected`` halts at once, through the campaign itself), then the receiver's
``guard_settled``/``guard_decision`` events turned into tyres by the fleet evidence
(:func:`edgeos_cloud.fleet.evidence.tyres_of_device`). :func:`judge` first checks the α budget
(Σ r ≥ (1 − α) Σ d) as the gateway's guard keeps it: over the gateway's stored tyres, slack
earned before the rollout included. Then it compares each canary's tyres under the winner with
the same gateway's tyres before it (the champion the winner replaced) by the competition's
stratified rule (:func:`edgeos_cloud.fleet.competition.compare`), strata = raw-material class
× batch freshness (:func:`canary_strata`): a fresh batch's poor first tyres are compared with
fresh tyres of the champion, not with its settled ones. **Worse** only when the winner is worse
with the stated confidence (the one-sided upper bound of the difference below ``-margin``);
**wait** while either side has too few tyres in the shared strata; a canary that reaches the
wait bound (``max_tyres`` under the winner) is decided on coarser strata, or on its α budget
alone when it has no comparable champion tyres. Worse, or a broken budget → the campaign is
halted and the previous champion/profile is re-published as a **new** version to the canaries
(the gateways' version floor forbids going back by number). Healthy → the campaign advances to
the group. Every rollout is recorded in ``<home>/rollouts/<name>.json`` with the watch's latest
judgement (``edgeos-cloud fleet rollouts``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

from edgeos_cloud.fleet.competition import Comparison, compare
from edgeos_cloud.fleet.evidence import material_class
from edgeos_cloud.fleet.profiles import ProfileStore, build_profile_bundle, next_config_version
from edgeos_cloud.ota.campaign import Campaign, Stage
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_protocol.fsutil import atomic_write_json, read_json
from edgeos_protocol.profile import Profile

__all__ = [
    "CanaryEvidence",
    "CanaryJudgement",
    "Judgement",
    "Rollout",
    "RolloutRefused",
    "Rollouts",
    "canary_strata",
    "judge",
]

Kind = Literal["model", "profile"]
Status = Literal["canary", "group", "done", "halted"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class RolloutRefused(ValueError):
    """A rollout cannot start (targets refuse the profile, canaries share a channel, …)."""


@dataclass(frozen=True, slots=True)
class CanaryEvidence:
    """One canary's tyres: rewards before the rollout (the champion), after it (the winner)
    and the default policy's reward for the latter, as the gateway's budget counts it."""

    device: str
    before: Sequence[float]
    after: Sequence[float]
    after_default: Sequence[float]
    alpha: float
    #: The default policy's reward for the ``before`` tyres. Given, the budget is checked as the
    #: gateway's guard keeps it: over its whole history, slack earned before the rollout
    #: included; without it, over the rollout's tyres alone (stricter).
    before_default: Sequence[float] | None = None
    #: The stratum of each ``before``/``after`` tyre, ``"<material class>/<freshness>"``
    #: (:func:`canary_strata`; ``?`` for what the evidence does not have). Without them every
    #: tyre is in one stratum: the comparison is pooled.
    before_strata: Sequence[str] | None = None
    after_strata: Sequence[str] | None = None
    #: The raw-material batch of each tyre (:func:`canary_batches`). Tyres of one batch share
    #: its material, so they are one unit of evidence: the comparison takes each batch's mean
    #: per stratum. Without them (or ``None`` for a tyre) every tyre is its own unit.
    before_batches: Sequence[str | None] | None = None
    after_batches: Sequence[str | None] | None = None


@dataclass(frozen=True, slots=True)
class CanaryJudgement:
    """What the judge found on one canary (recorded with the rollout)."""

    device: str
    verdict: Literal["wait", "healthy", "worse"]
    reason: str
    #: Tyres under the winner / before it, all of them.
    tyres_after: int
    tyres_before: int
    #: The stratified comparison (winner − champion), ``None`` when nothing was comparable.
    estimate: float | None = None
    se: float | None = None
    #: One-sided upper bound of the difference at the judge's confidence; worse when it is
    #: below ``-margin``.
    upper_bound: float | None = None
    #: P(winner worse than the champion by more than ``margin``) under the normal approximation.
    p_worse: float | None = None
    #: Unstratified difference of means, for comparison.
    naive: float | None = None
    strata: int = 0
    n_after: int = 0
    n_before: int = 0
    #: Stratum dimensions the comparison used (``material``, ``freshness``; empty: pooled).
    dimensions: tuple[str, ...] = ()
    #: Decided because the canary reached the wait bound (``max_tyres`` under the winner).
    at_bound: bool = False
    #: The comparison's unit: ``batch`` (each raw-material batch's mean per stratum) or
    #: ``tyre``.
    unit: str = "tyre"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dimensions"] = list(self.dimensions)
        return out


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Literal["wait", "healthy", "worse"]
    reason: str
    #: Per canary, in the order given (empty when a broken α budget decided at once).
    canaries: tuple[CanaryJudgement, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "canaries": [c.as_dict() for c in self.canaries],
        }


#: Strata dimensions of a canary's tyres, finest first; at the wait bound the judge drops them
#: from the left until both sides have enough tyres (material → freshness only → pooled).
_DIMENSIONS = ("material", "freshness")
_LEVELS: tuple[tuple[int, ...], ...] = ((0, 1), (1,), ())


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _round(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None


def _coarse(key: str, keep: tuple[int, ...]) -> str:
    parts = key.split("/")
    return "/".join(parts[i] for i in keep if i < len(parts))


def _budget(ev: CanaryEvidence) -> str | None:
    """Why the canary's α budget is broken, or ``None``."""
    r, d, since = sum(ev.after), sum(ev.after_default), "since the rollout"
    if ev.before_default is not None and len(ev.before_default) == len(ev.before):
        # A window of a few tyres alone would halt a gateway whose guard spent slack it had
        # earned, within its budget (seen in tests/e2e/test_mtl_e2e.py).
        r, d, since = r + sum(ev.before), d + sum(ev.before_default), "over its history"
    if ev.after and r < (1.0 - ev.alpha) * d - 1e-9:
        return f"{ev.device}: α budget broken {since} (Σr {r:.2f} < (1−{ev.alpha}) Σd {d:.2f})"
    return None


def _enough(tyres: tuple[int, int], strata: int, min_tyres: int, min_strata: int) -> bool:
    return min(tyres) >= min_tyres and strata >= min_strata


def _units(
    strata: Sequence[str], rewards: Sequence[float], batches: Sequence[str | None] | None
) -> list[tuple[str, float, int]]:
    """``(stratum, mean reward, tyres)`` per batch and stratum (a tyre without a batch alone)."""
    groups: dict[tuple[str, str | int], list[float]] = {}
    for i, (s, r) in enumerate(zip(strata, rewards, strict=True)):
        b = None if batches is None else batches[i]
        groups.setdefault((s, i if b is None else b), []).append(r)
    return [(s, _mean(rs), len(rs)) for (s, _), rs in groups.items()]


def _judge_canary(
    ev: CanaryEvidence,
    *,
    min_tyres: int,
    margin: float,
    confidence: float,
    min_per_stratum: int,
    min_strata: int,
    max_tyres: int,
) -> CanaryJudgement:
    at_bound = len(ev.after) >= max_tyres
    after_keys = ev.after_strata if ev.after_strata is not None else [""] * len(ev.after)
    before_keys = ev.before_strata if ev.before_strata is not None else [""] * len(ev.before)
    # Before the bound only the finest strata count; at the bound, coarser ones are tried.
    # Batches are the units; at the bound, tyres too (one batch under the winner is no sample
    # of batches, but a winner far worse on every tyre of it is worse).
    levels = (
        [(k, True) for k in _LEVELS] + [(k, False) for k in _LEVELS]
        if at_bound
        else [(_LEVELS[0], True)]
    )
    cmp: Comparison | None = None
    keep: tuple[int, ...] = _LEVELS[0]
    by_batch = True
    tyres_in: tuple[int, int] = (0, 0)
    for keep, by_batch in levels:
        a_batches = ev.after_batches if by_batch else None
        b_batches = ev.before_batches if by_batch else None
        after = _units([_coarse(s, keep) for s in after_keys], ev.after, a_batches)
        before = _units([_coarse(s, keep) for s in before_keys], ev.before, b_batches)
        cmp = compare(
            [(s, r) for s, r, _ in after],
            [(s, r) for s, r, _ in before],
            min_per_stratum=min_per_stratum,
            confidence=confidence,
        )
        shared = set(cmp.per_stratum)
        # Minimum evidence is counted in tyres; the units (batches) carry the variance.
        tyres_in = (
            sum(n for s, _, n in after if s in shared),
            sum(n for s, _, n in before if s in shared),
        )
        if _enough(tyres_in, cmp.strata, min_tyres, min_strata):
            break
    assert cmp is not None
    dims = tuple(_DIMENSIONS[i] for i in keep) if ev.after_strata is not None else ()
    now, then = _mean(ev.after), _mean(ev.before)
    means = (
        f"mean reward {now:.3f} over {len(ev.after)} tyres, "
        f"champion {then:.3f} over {len(ev.before)}"
    )
    base = CanaryJudgement(
        ev.device,
        "wait",
        "",
        tyres_after=len(ev.after),
        tyres_before=len(ev.before),
        naive=_round(now - then),
        strata=cmp.strata,
        n_after=tyres_in[0],
        n_before=tyres_in[1],
        dimensions=dims,
        at_bound=at_bound,
        unit="batch" if by_batch and ev.after_batches is not None else "tyre",
    )
    if not _enough(tyres_in, cmp.strata, min_tyres, min_strata):
        short = (
            f"{tyres_in[0]} tyres under the winner and {tyres_in[1]} before it in "
            f"{cmp.strata} shared strata (need {min_tyres} each, {min_strata} strata)"
        )
        if not at_bound:
            return replace(base, reason=f"{ev.device}: too little comparable evidence: {short}")
        # The bound: the α budget (checked before) is all that can be said; not worse with
        # confidence means not halted.
        return replace(
            base,
            verdict="healthy",
            reason=f"{ev.device}: decided at the wait bound ({max_tyres} tyres under the winner) "
            f"without comparable champion evidence ({short}); α budget holds",
        )
    z = NormalDist().inv_cdf(confidence)
    upper = cmp.estimate + z * cmp.se
    if cmp.se > 0:
        p_worse = NormalDist().cdf((-margin - cmp.estimate) / cmp.se)
    else:
        p_worse = float(cmp.estimate < -margin)
    unit = "batch" if by_batch and ev.after_batches is not None else "tyre"
    over = f"over {cmp.strata} strata ({'×'.join(dims) or 'pooled'}, per {unit})"
    stats = replace(
        base,
        estimate=_round(cmp.estimate),
        se=_round(cmp.se),
        upper_bound=_round(upper),
        p_worse=round(p_worse, 6),
    )
    coarser = keep != _LEVELS[0] or (not by_batch and ev.after_batches is not None)
    bound_note = f", at the wait bound ({max_tyres} tyres)" if at_bound and coarser else ""
    if upper < -margin:
        return replace(
            stats,
            verdict="worse",
            reason=f"{ev.device}: {means}; stratified Δ {cmp.estimate:+.3f} (upper "
            f"{confidence:.0%} bound {upper:+.3f} < −margin {margin:g}) {over}{bound_note}",
        )
    return replace(
        stats,
        verdict="healthy",
        reason=f"{ev.device}: not worse with {confidence:.0%} confidence: stratified Δ "
        f"{cmp.estimate:+.3f} (upper bound {upper:+.3f} ≥ −margin {margin:g}) {over}"
        f"{bound_note}; {means}",
    )


def judge(
    evidence: Sequence[CanaryEvidence],
    *,
    min_tyres: int = 20,
    margin: float = 0.0,
    confidence: float = 0.95,
    min_per_stratum: int = 2,
    min_strata: int = 1,
    max_tyres: int | None = None,
) -> Judgement:
    """Judge the canaries (pure; see the module docstring).

    Worse as soon as any canary's α budget is broken. Otherwise each canary's tyres under the
    winner are compared with its own tyres before it by the competition's stratified rule
    (:func:`~edgeos_cloud.fleet.competition.compare`: strata = material class × batch
    freshness, CMH weights): **worse** when the one-sided ``confidence`` upper bound of the
    difference is below ``-margin`` — the winner is worse with that confidence — given at least
    ``min_tyres`` tyres on each side in ``min_strata`` shared strata (``min_per_stratum`` each);
    **wait** while the evidence is thinner; **healthy** when every canary has the evidence and
    none is worse. A canary with ``max_tyres`` (default ``3 × min_tyres``) tyres under the
    winner is decided: the strata are coarsened until both sides have the evidence (freshness
    only, then pooled); when even the pooled champion tyres are too few, it is healthy on its
    α budget, and the reason says so.
    """
    if min_per_stratum < 2:
        raise ValueError("min_per_stratum must be at least 2 (a stratum's variance)")
    bound = max(min_tyres, 3 * min_tyres if max_tyres is None else max_tyres)
    found: list[CanaryJudgement] = []
    for ev in evidence:
        broken = _budget(ev)
        if broken is not None:
            return Judgement("worse", broken, tuple(found))
        found.append(
            _judge_canary(
                ev,
                min_tyres=min_tyres,
                margin=margin,
                confidence=confidence,
                min_per_stratum=min_per_stratum,
                min_strata=min_strata,
                max_tyres=bound,
            )
        )
    canaries = tuple(found)
    worse = [c for c in canaries if c.verdict == "worse"]
    if worse:
        return Judgement("worse", worse[0].reason, canaries)
    waiting = [c for c in canaries if c.verdict == "wait"]
    if waiting or not evidence:
        names = ", ".join(c.device for c in waiting) or "no canary"
        detail = "; ".join(c.reason for c in waiting)
        return Judgement(
            "wait", f"too few tyres on {names}" + (f" ({detail})" if detail else ""), canaries
        )
    return Judgement(
        "healthy",
        f"{len(evidence)} canary(ies) no worse than their champion: "
        + "; ".join(c.reason for c in canaries),
        canaries,
    )


@dataclass
class Rollout:
    name: str
    group: str
    kind: Kind
    #: ``task@version`` of a model winner, ``name@version`` of a profile.
    winner: str
    #: What it replaces (the rollback target).
    champion: str
    canaries: list[str]
    members: list[str]
    channels: dict[str, str]
    hardware: str
    target: str
    campaign: str
    started_us: int
    alpha: float
    status: Status = "canary"
    reason: str = ""
    rollback_target: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The watch's latest judgement (:meth:`Judgement.as_dict`: verdict, reason, per canary
    #: the stratified estimate, its bound, P(worse), the evidence); ``None`` before the first.
    judgement: dict[str, Any] | None = None

    def note(self, what: str, **details: Any) -> None:
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.history.append({"at": at, "event": what, **details})


#: A station's first tyres of a raw-material batch are its ``fresh`` stratum: a fresh batch needs a
#: hotter start that fades within a few cycles (e-folding 1.5 cycles in the line physics, so the
#: third tyre's extra need is a quarter of the first's).
FRESH_TYRES = 2


def canary_strata(
    tyres: Sequence[Any], *, material_bin_mu: float = 3.0, fresh_tyres: int = FRESH_TYRES
) -> list[str]:
    """The judge's stratum of each of a gateway's tyres, in the order given:
    ``"<material class>/<freshness>"`` — the Mooney bin of the competition
    (:func:`~edgeos_cloud.fleet.evidence.material_class`) and ``fresh`` for a station's first
    ``fresh_tyres`` tyres of a raw-material batch (counted over the tyres given, in load order
    per station), else ``settled``; ``?`` where the tyre carries no Mooney or batch (tyres read
    ``with_material=False``)."""
    order = sorted(
        range(len(tyres)),
        key=lambda i: (str(getattr(tyres[i], "station", "")), int(tyres[i].ts_us)),
    )
    fresh: dict[int, str] = {}
    run: tuple[str, Any] | None = None
    count = 0
    for i in order:
        t = tyres[i]
        batch = getattr(t, "batch", None)
        if batch is None:
            fresh[i], run = "?", None
            continue
        key = (str(getattr(t, "station", "")), batch)
        count = count + 1 if key == run else 0
        run = key
        fresh[i] = "fresh" if count < fresh_tyres else "settled"
    return [
        f"{material_class(getattr(t, 'mooney', None), material_bin_mu)}/{fresh[i]}"
        for i, t in enumerate(tyres)
    ]


def _batch_of(tyre: Any) -> str | None:
    """A tyre's raw-material batch as a unit of evidence (batch ids are per line)."""
    batch = getattr(tyre, "batch", None)
    return None if batch is None else f"{getattr(tyre, 'device', '')}#{batch}"


#: Publishes the previous champion again for a model rollback: ``(rollout) → target path``.
ModelRollback = Callable[[Rollout], str]
#: Turns a device's stored events into tyres (:func:`edgeos_cloud.fleet.evidence.tyres_of_device`).
TyreSource = Callable[[str], Sequence[Any]]


class Rollouts:
    """Start, watch and record rollouts (the files live under ``home``)."""

    def __init__(self, repo_dir: Path, home: Path, store: ProfileStore | None = None) -> None:
        self.repo = OtaRepository(repo_dir)
        self.home = Path(home)
        self.dir = self.home / "rollouts"
        self.store = store or ProfileStore(self.home)

    # ------------------------------------------------------------------ records

    def save(self, rollout: Rollout) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / f"{rollout.name}.json", asdict(rollout))

    def load(self, name: str) -> Rollout:
        if not _NAME_RE.match(name):
            raise KeyError(name)
        return Rollout(**read_json(self.dir / f"{name}.json"))

    def all(self) -> list[Rollout]:
        if not self.dir.is_dir():
            return []
        return sorted(
            (self.load(p.stem) for p in self.dir.glob("*.json")), key=lambda r: r.started_us
        )

    def current(self, group: str) -> dict[str, str]:
        """The bundles the group's newest *completed* rollouts put in force, by kind
        (``{"models": target, "config": target}``): what bootstrap offers a new gateway."""
        found: dict[str, str] = {}
        for r in self.all():
            if r.group != group:
                continue
            kind = "models" if r.kind == "model" else "config"
            if r.status == "done":
                found[kind] = r.target
            elif r.status == "halted" and r.rollback_target and kind in found:
                found[kind] = r.rollback_target
        return found

    # ------------------------------------------------------------------ start

    def _channels(
        self, members: Sequence[str], canaries: Sequence[str], channels: Mapping[str, str] | None
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        for device in members:
            if channels is not None and device in channels:
                out[device] = channels[device]
                continue
            summary = self.store.summary(device)
            if summary is None or not summary.ota_group:
                raise RolloutRefused(f"{device}: no config_summary with its [ota] group yet")
            out[device] = summary.ota_group
        canary_channels = {out[c] for c in canaries}
        shared = sorted(d for d in members if d not in canaries and out[d] in canary_channels)
        if shared:
            raise RolloutRefused(
                f"canary channel(s) {sorted(canary_channels)} also serve {shared}: "
                "give each canary an [ota] group of its own"
            )
        return out

    def _start(self, r: Rollout) -> Rollout:
        if not _NAME_RE.match(r.name) or (self.dir / f"{r.name}.json").exists():
            raise RolloutRefused(f"rollout {r.name!r} exists or is not a valid name")
        canary = sorted({r.channels[c] for c in r.canaries})
        rest = sorted({r.channels[d] for d in r.members if d not in r.canaries})
        # A config bundle is trialled and reported; a models bundle is live without a report.
        trialled = r.kind == "profile"
        stages = [Stage("canary", tuple(canary), 0.0, len(r.canaries) if trialled else 0)]
        if rest:
            stages.append(Stage("group", tuple(rest), 0.0, 1 if trialled else 0))
        campaign = Campaign.create(self.repo, r.campaign, r.target, stages)
        campaign.start()
        r.note("started", target=r.target, canary_channels=canary)
        self.save(r)
        return r

    def start_profile(
        self,
        group: str,
        profile: Profile,
        *,
        members: Sequence[str],
        canaries: Sequence[str],
        hardware: str,
        champion: Profile | None,
        now_us: int,
        alpha: float = 0.005,
        channels: Mapping[str, str] | None = None,
    ) -> Rollout:
        """Validate ``profile`` against every member's latest summary, build and publish its
        config bundle, and start the canary stage."""
        if not canaries or not set(canaries) <= set(members):
            raise RolloutRefused("canaries must be members of the group")
        chans = self._channels(members, canaries, channels)
        version = next_config_version(self.repo.published(), hardware)
        work = self.home / "work"
        try:
            bundle = build_profile_bundle(
                self.store, profile, members, hardware=hardware, version=version, out_dir=work
            )
        except ValueError as exc:
            raise RolloutRefused(str(exc)) from exc
        published = self.repo.publish(bundle)
        bundle.unlink(missing_ok=True)
        name = f"{group}-profile-{profile.name}-{profile.version}"
        return self._start(
            Rollout(
                name=name,
                group=group,
                kind="profile",
                winner=f"{profile.name}@{profile.version}",
                champion="" if champion is None else f"{champion.name}@{champion.version}",
                canaries=list(canaries),
                members=list(members),
                channels=chans,
                hardware=hardware,
                target=published.target_path,
                campaign=name,
                started_us=now_us,
                alpha=alpha,
            )
        )

    def start_model(
        self,
        group: str,
        *,
        winner: str,
        champion: str,
        target: str,
        members: Sequence[str],
        canaries: Sequence[str],
        hardware: str,
        now_us: int,
        alpha: float = 0.005,
        channels: Mapping[str, str] | None = None,
    ) -> Rollout:
        """Start the canary stage of an already published ``models`` bundle (``target``,
        e.g. from :func:`edgeos_cloud.models.publish.publish_version`'s bundle): gateways load
        every model of it as a challenger."""
        if not canaries or not set(canaries) <= set(members):
            raise RolloutRefused("canaries must be members of the group")
        chans = self._channels(members, canaries, channels)
        name = f"{group}-model-{re.sub(r'[^A-Za-z0-9_.-]', '-', winner)}"
        return self._start(
            Rollout(
                name=name,
                group=group,
                kind="model",
                winner=winner,
                champion=champion,
                canaries=list(canaries),
                members=list(members),
                channels=chans,
                hardware=hardware,
                target=target,
                campaign=name,
                started_us=now_us,
                alpha=alpha,
            )
        )

    # ------------------------------------------------------------------ watch

    def evidence(
        self,
        r: Rollout,
        tyres_of: TyreSource,
        devices: Sequence[str],
        *,
        material_bin_mu: float = 3.0,
        fresh_tyres: int = FRESH_TYRES,
    ) -> list[CanaryEvidence]:
        out = []
        for device in devices:
            tyres = list(tyres_of(device))
            strata = canary_strata(tyres, material_bin_mu=material_bin_mu, fresh_tyres=fresh_tyres)
            before = [i for i, t in enumerate(tyres) if not self._under_winner(r, t)]
            after = [i for i, t in enumerate(tyres) if self._under_winner(r, t)]
            out.append(
                CanaryEvidence(
                    device,
                    [tyres[i].reward for i in before],
                    [tyres[i].reward for i in after],
                    [tyres[i].default_reward for i in after],
                    r.alpha,
                    [tyres[i].default_reward for i in before],
                    before_strata=[strata[i] for i in before],
                    after_strata=[strata[i] for i in after],
                    before_batches=[_batch_of(tyres[i]) for i in before],
                    after_batches=[_batch_of(tyres[i]) for i in after],
                )
            )
        return out

    @staticmethod
    def _under_winner(r: Rollout, tyre: Any) -> bool:
        """Made since the rollout started — and, for a profile, under the winner's profile: a
        config bundle takes effect only when the gateway restarts into its trial slot, and the
        tyres it made under its old profile in between are its champion's, not the winner's
        (counted as such, a fresh batch in that gap halted a healthy canary in
        tests/e2e/test_mtl_profile_e2e.py). Tyres without a profile (tests) go by time alone."""
        if tyre.ts_us < r.started_us:
            return False
        profile = getattr(tyre, "profile", None)
        return r.kind != "profile" or profile is None or profile == r.winner

    def step(
        self,
        name: str,
        tyres_of: TyreSource,
        *,
        min_tyres: int = 20,
        margin: float = 0.0,
        model_rollback: ModelRollback | None = None,
        confidence: float = 0.95,
        min_per_stratum: int = 2,
        min_strata: int = 1,
        max_tyres: int | None = None,
        material_bin_mu: float = 3.0,
        fresh_tyres: int = FRESH_TYRES,
    ) -> Rollout:
        """One watch step (idempotent; run it from a timer): halt + roll back, advance, or wait.

        The judge's settings are :func:`judge`'s; ``material_bin_mu`` and ``fresh_tyres`` make
        the strata (:func:`canary_strata`). The judgement is kept in :attr:`Rollout.judgement`.
        """
        r = self.load(name)
        if r.status in ("done", "halted"):
            return r
        campaign = Campaign(self.repo, r.campaign)
        summary = campaign.summary()
        failed = {d: v for d, v in summary["devices"].items() if v["outcome"] != "committed"}
        if summary["status"] == "halted" or failed:
            reason = summary["halted_reason"] or f"OTA failures: {sorted(failed)}"
            return self._halt(r, campaign, f"campaign halted: {reason}", model_rollback)
        watched = r.canaries if r.status == "canary" else r.members
        evidence = self.evidence(
            r, tyres_of, watched, material_bin_mu=material_bin_mu, fresh_tyres=fresh_tyres
        )
        judgement = judge(
            evidence,
            min_tyres=min_tyres,
            margin=margin,
            confidence=confidence,
            min_per_stratum=min_per_stratum,
            min_strata=min_strata,
            max_tyres=max_tyres,
        )
        found = judgement.as_dict()
        changed = found != r.judgement
        r.judgement = found
        if judgement.verdict == "worse":
            return self._halt(r, campaign, judgement.reason, model_rollback)
        committed = {d for d, v in summary["devices"].items() if v["outcome"] == "committed"}
        # A config bundle is trialled on the gateway: its stage waits for the commits too.
        if judgement.verdict == "healthy" and (r.kind == "model" or set(watched) <= committed):
            status = campaign.advance()
            r.status = "done" if status == "done" else "group"
            r.reason = judgement.reason
            r.note("advanced", to=r.status, reason=judgement.reason)
            self.save(r)
        elif changed:
            # A timer steps this every few minutes: the record changes only with the evidence.
            self.save(r)
        return r

    def _halt(
        self, r: Rollout, campaign: Campaign, reason: str, model_rollback: ModelRollback | None
    ) -> Rollout:
        campaign.halt(reason)
        r.status, r.reason = "halted", reason
        canary_channels = sorted({r.channels[c] for c in r.canaries})
        if r.kind == "profile" and r.champion:
            prev_name, _, prev_version = r.champion.partition("@")
            previous = self.store.version(prev_name, int(prev_version))
            again = previous.with_version(self.store.next_version(prev_name))
            version = next_config_version(self.repo.published(), r.hardware)
            bundle = build_profile_bundle(
                self.store,
                again,
                r.canaries,
                hardware=r.hardware,
                version=version,
                out_dir=self.home / "work",
            )
            published = self.repo.publish(bundle)
            bundle.unlink(missing_ok=True)
            self.repo.set_channels(canary_channels, published.target_path)
            r.rollback_target = published.target_path
            r.note("rolled back", profile=f"{again.name}@{again.version}", of=r.champion)
        elif r.kind == "model" and model_rollback is not None:
            target = model_rollback(r)
            self.repo.set_channels(canary_channels, target)
            r.rollback_target = target
            r.note("rolled back", target=target, of=r.champion)
        r.note("halted", reason=reason)
        self.save(r)
        return r
