"""The competition: a winner only when it is better with stated confidence.

**The rule** (``[fleet.competition]``; docs/fleet.md has the reasoning). For the group's
champion policy H and a challenger C, every measured tyre is put in a stratum — its raw-material
class (lab Mooney bin), optionally its line and batch. Only strata where *both* policies have at
least ``min_per_stratum`` tyres count. In each such stratum ``s``::

    δ_s = mean r(C, s) − mean r(H, s)            v_s = s²(C, s)/n(C, s) + s²(H, s)/n(H, s)

and the strata are pooled with weights proportional to ``n_C·n_H/(n_C+n_H)`` (the
Cochran–Mantel–Haenszel weights: the information each stratum carries about a difference)::

    Δ = Σ w_s δ_s,    SE = √(Σ w_s² v_s),    bound = Δ − z_(1−β) · SE

with ``z`` the normal quantile at the one-sided confidence ``1 − β`` (Bonferroni-corrected,
``β/k``, when ``k`` challengers compete at once). The challenger wins only when it has at
least ``min_tyres`` tyres and the champion too (both in the shared strata), the shared strata
number at least ``min_strata``, and ``bound > margin``. Otherwise the champion stays: "too
little evidence", "tie" (the bound does not clear the margin while Δ > 0), or "champion
better". Because differences are taken *within* a raw-material class, a line that happened to
get easy rubber lifts neither side of the comparison (the unstratified difference is recorded
next to it, ``naive``, to show when the two disagree).

**Combinations.** Two winning profiles that change different set-points (line A's start
temperature, line B's pressure) make a third candidate, :func:`combine`; :func:`screen` runs the
three (and the plant default) in the group's calibrated twin simulator with common random
numbers, before any line runs the combination, and states whether the combination beats the
better single candidate with confidence (the paired difference's one-sided lower bound, the
same ``confidence`` and ``margin`` as the rule). The fleet loop
(:func:`edgeos_cloud.fleet.loop.run_once`) does this for every step that declares a profile
winner with a partner and records it as a ``combination`` record.

Every decision is a :class:`Competition` record, persisted by :class:`CompetitionStore`
(SQLite, ``<home>/competitions.db``); :func:`contest` returns the winner *and* this step's
records (the loop looks for a second winner or a strong runner-up among them).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from edgeos_cloud.fleet.config import CompetitionSettings
from edgeos_cloud.fleet.evidence import Tyre, split_policy, stratum_of
from edgeos_cloud.fleet.twinsim import Candidate, ScreenResult, TwinSimulator

__all__ = [
    "Combination",
    "CombinationRefused",
    "Comparison",
    "Competition",
    "CompetitionStore",
    "Contest",
    "Winner",
    "combine",
    "compare",
    "contest",
    "decide",
    "screen",
]


@dataclass(frozen=True, slots=True)
class Comparison:
    """The stratified comparison of a challenger with the champion."""

    estimate: float
    se: float
    bound: float
    #: P(Δ > margin) under the normal approximation.
    confidence: float
    naive: float
    strata: int
    n_challenger: int
    n_champion: int
    per_stratum: Mapping[str, tuple[float, int, int]] = field(default_factory=dict)


def compare(
    challenger: Sequence[tuple[str, float]],
    champion: Sequence[tuple[str, float]],
    *,
    min_per_stratum: int = 5,
    confidence: float = 0.95,
    margin: float = 0.0,
) -> Comparison:
    """Stratified difference in mean reward (challenger − champion) with a one-sided bound.

    Each argument is a sequence of ``(stratum, reward)``. See the module docstring.
    """
    c_by: dict[str, list[float]] = defaultdict(list)
    h_by: dict[str, list[float]] = defaultdict(list)
    for s, r in challenger:
        c_by[s].append(r)
    for s, r in champion:
        h_by[s].append(r)
    naive = (
        float(np.mean([r for _, r in challenger]) - np.mean([r for _, r in champion]))
        if challenger and champion
        else math.nan
    )
    shared = sorted(
        s
        for s in set(c_by) & set(h_by)
        if len(c_by[s]) >= min_per_stratum and len(h_by[s]) >= min_per_stratum
    )
    if not shared:
        return Comparison(math.nan, math.nan, math.nan, 0.0, naive, 0, 0, 0)
    deltas, variances, weights, per = [], [], [], {}
    for s in shared:
        c, h = np.asarray(c_by[s]), np.asarray(h_by[s])
        d = float(c.mean() - h.mean())
        v = float(c.var(ddof=1) / c.size + h.var(ddof=1) / h.size)
        deltas.append(d)
        variances.append(v)
        weights.append(c.size * h.size / (c.size + h.size))
        per[s] = (round(d, 5), int(c.size), int(h.size))
    w = np.asarray(weights) / np.sum(weights)
    est = float(np.dot(w, deltas))
    se = float(math.sqrt(float(np.dot(w**2, variances))))
    z = NormalDist().inv_cdf(confidence)
    conf = NormalDist().cdf((est - margin) / se) if se > 0 else float(est > margin)
    return Comparison(
        estimate=est,
        se=se,
        bound=est - z * se,
        confidence=conf,
        naive=naive,
        strata=len(shared),
        n_challenger=sum(len(c_by[s]) for s in shared),
        n_champion=sum(len(h_by[s]) for s in shared),
        per_stratum=per,
    )


@dataclass(frozen=True, slots=True)
class Winner:
    """A challenger declared better than the group's champion, with its evidence.

    ``winner`` and ``champion`` are policy keys (``<model key>|<profile key>``); ``model`` is
    the winning model's registry key (``correction@1.2.0``) when the model differs from the
    champion's, ``profile`` the winning profile's key when that differs. ``task`` is the
    model's task, or ``"profile"`` when only the profile differs.
    """

    group: str
    task: str
    winner: str
    champion: str
    model: str | None
    profile: str | None
    estimate: float
    bound: float
    confidence: float
    #: Tyres per competitor in the shared strata, by policy key.
    evidence: Mapping[str, int]
    strata: int
    competition_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "evidence": dict(self.evidence)}


@dataclass(frozen=True, slots=True)
class Competition:
    """One decision of the rule, as persisted.

    The rule's records have the challenger's ``task`` (a model family or ``profile``); a twin
    screening of a combination is recorded with ``task="combination"``, the twin's paired
    difference (combination − better single candidate) as estimate/SE/bound/confidence, the
    twin's tyres per candidate as ``evidence`` and the details in ``screening``.
    """

    group: str
    task: str
    champion: str
    challenger: str
    #: The rule: ``winner`` (challenger declared), ``tie``, ``champion_better``,
    #: ``insufficient``. A screening: ``combined`` (the combination is rolled out), ``single``
    #: (not better with confidence: the winner is), ``refused`` (not a combination, does not fit
    #: a target, or the twin cannot play it).
    decision: str
    reason: str
    estimate: float | None
    se: float | None
    bound: float | None
    confidence: float | None
    naive: float | None
    strata: int
    evidence: Mapping[str, int]
    settings: Mapping[str, Any]
    ts: float = 0.0
    id: int | None = None
    #: A combination's screening: candidates, twin results, profiles, what was rolled out.
    screening: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "evidence": dict(self.evidence),
            "settings": dict(self.settings),
            "screening": None if self.screening is None else dict(self.screening),
        }


def _task_of(champion: str, challenger: str) -> tuple[str, str | None, str | None]:
    cm, cp = split_policy(challenger)
    hm, hp = split_policy(champion)
    model = cm if cm != hm else None
    profile = cp if cp != hp else None
    if model is None:
        return "profile", None, profile
    return model.split("@", 1)[0], model, profile


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True, slots=True)
class Contest:
    """One run of the rule: the winner (``None``: the champion stays) and every challenger's
    record, in challenger order (with ids when a store recorded them)."""

    winner: Winner | None
    records: tuple[Competition, ...]


def decide(
    group: str,
    champion: str,
    tyres: Sequence[Tyre],
    settings: CompetitionSettings | None = None,
    *,
    challengers: Iterable[str] | None = None,
    store: CompetitionStore | None = None,
    now: float | None = None,
) -> Winner | None:
    """Run the rule for ``group``: the best challenger that beats ``champion`` with confidence.

    ``tyres`` are the group's evidence (:func:`~edgeos_cloud.fleet.evidence.load_tyres`);
    ``challengers`` default to every other policy in it. Every comparison is recorded in
    ``store`` when given. Returns ``None`` when the champion stays.
    """
    return contest(
        group, champion, tyres, settings, challengers=challengers, store=store, now=now
    ).winner


def contest(
    group: str,
    champion: str,
    tyres: Sequence[Tyre],
    settings: CompetitionSettings | None = None,
    *,
    challengers: Iterable[str] | None = None,
    store: CompetitionStore | None = None,
    now: float | None = None,
) -> Contest:
    """:func:`decide`, returning every challenger's record too."""
    cfg = settings or CompetitionSettings()
    ts = time.time() if now is None else now
    by_policy: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for t in tyres:
        by_policy[t.policy].append((stratum_of(t, cfg.strata, cfg.material_bin_mu), t.reward))
    names = sorted(set(challengers) if challengers is not None else set(by_policy) - {champion})
    names = [n for n in names if n != champion]
    if not names:
        return Contest(None, ())
    # Bonferroni: k simultaneous one-sided tests at β/k each.
    conf = 1.0 - (1.0 - cfg.confidence) / len(names)
    best: tuple[Comparison, str, int | None] | None = None
    records: list[Competition] = []
    for name in names:
        cmp = compare(
            by_policy.get(name, []),
            by_policy.get(champion, []),
            min_per_stratum=cfg.min_per_stratum,
            confidence=conf,
            margin=cfg.margin,
        )
        decision, reason = _judge(cmp, cfg)
        task, _, _ = _task_of(champion, name)
        record = Competition(
            group=group,
            task=task,
            champion=champion,
            challenger=name,
            decision=decision,
            reason=reason,
            estimate=_finite(cmp.estimate),
            se=_finite(cmp.se),
            bound=_finite(cmp.bound),
            confidence=round(cmp.confidence, 6),
            naive=_finite(cmp.naive),
            strata=cmp.strata,
            evidence={name: cmp.n_challenger, champion: cmp.n_champion},
            settings={**cfg.model_dump(mode="json"), "confidence_corrected": conf},
            ts=ts,
        )
        rid = store.add(record) if store is not None else None
        records.append(replace(record, id=rid))
        if decision == "winner" and (best is None or cmp.bound > best[0].bound):
            best = (cmp, name, rid)
    if best is None:
        return Contest(None, tuple(records))
    cmp, name, rid = best
    task, model, profile = _task_of(champion, name)
    winner = Winner(
        group=group,
        task=task,
        winner=name,
        champion=champion,
        model=model,
        profile=profile,
        estimate=cmp.estimate,
        bound=cmp.bound,
        confidence=cmp.confidence,
        evidence={name: cmp.n_challenger, champion: cmp.n_champion},
        strata=cmp.strata,
        competition_id=rid,
    )
    return Contest(winner, tuple(records))


def _judge(cmp: Comparison, cfg: CompetitionSettings) -> tuple[str, str]:
    short = []
    if cmp.n_challenger < cfg.min_tyres:
        short.append(f"challenger {cmp.n_challenger} < {cfg.min_tyres} tyres")
    if cmp.n_champion < cfg.min_tyres:
        short.append(f"champion {cmp.n_champion} < {cfg.min_tyres} tyres")
    if cmp.strata < cfg.min_strata:
        short.append(f"{cmp.strata} shared strata < {cfg.min_strata}")
    if short:
        return "insufficient", "too little evidence: " + "; ".join(short) + " (champion kept)"
    if cmp.bound > cfg.margin:
        return "winner", (
            f"challenger better by {cmp.estimate:.4f} (lower bound {cmp.bound:.4f} > "
            f"margin {cfg.margin:g}) over {cmp.strata} strata"
        )
    if cmp.estimate > 0:
        return "tie", (
            f"tie: estimate {cmp.estimate:.4f} but lower bound {cmp.bound:.4f} <= margin "
            f"{cfg.margin:g} (champion kept)"
        )
    return "champion_better", f"champion better or equal (estimate {cmp.estimate:.4f})"


# --------------------------------------------------------------------------- combinations


class CombinationRefused(ValueError):
    """Two candidates cannot be combined (they set the same set-point differently)."""


def combine(a: Candidate, b: Candidate, name: str | None = None) -> Candidate:
    """The candidate with both ``a``'s and ``b``'s set-point changes."""
    clash = {k for k in set(a.setpoints) & set(b.setpoints) if a.setpoints[k] != b.setpoints[k]}
    if clash:
        raise CombinationRefused(
            f"{a.name} and {b.name} both change {sorted(clash)}: not a combination"
        )
    return Candidate(name or f"{a.name}+{b.name}", {**a.setpoints, **b.setpoints})


@dataclass(frozen=True, slots=True)
class Combination:
    """What screening two winners and their combination in the twin gave.

    ``best`` is the best candidate by mean reward; ``single`` the better of the two single
    candidates; ``estimate``/``se`` the paired (common random numbers) difference of the
    combination over ``single`` per tyre, ``bound`` its one-sided lower bound at
    ``confidence_level``, ``confidence`` = P(difference > ``margin``). ``combined_better``: the
    bound clears the margin — the combination beats the better winner with that confidence.
    """

    results: tuple[ScreenResult, ...]
    best: str
    combined: str
    single: str = ""
    estimate: float = math.nan
    se: float = math.nan
    bound: float = math.nan
    confidence: float = 0.0
    confidence_level: float = 0.95
    margin: float = 0.0

    @property
    def combined_better(self) -> bool:
        return math.isfinite(self.bound) and self.bound > self.margin

    def result(self, candidate: str) -> ScreenResult:
        return next(r for r in self.results if r.candidate == candidate)

    def as_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "combined": self.combined,
            "single": self.single,
            "estimate": _rounded(self.estimate),
            "se": _rounded(self.se),
            "bound": _rounded(self.bound),
            "confidence": round(self.confidence, 6),
            "confidence_level": self.confidence_level,
            "margin": self.margin,
            "combined_better": self.combined_better,
            "results": [r.as_dict() for r in self.results],
        }


def _rounded(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None


def screen(
    a: Candidate,
    b: Candidate,
    twin: TwinSimulator,
    *,
    cycles: int,
    base: Candidate | None = None,
    confidence: float = 0.95,
    margin: float = 0.0,
) -> Combination:
    """Screen ``a``, ``b``, their combination and the plant default in ``twin``.

    ``a`` and ``b`` hold the set-points each changes; with ``base`` (the champion's recipe),
    every candidate is played on top of it and the champion is screened too. All runs share the
    twin's batches and noise, so the combination is compared with the better single candidate
    tyre for tyre (per-cycle line means are the paired units). Raises
    :class:`CombinationRefused` when both set a set-point differently.
    """
    both = combine(a, b)

    def over(c: Candidate) -> Candidate:
        return c if base is None else Candidate(c.name, {**base.setpoints, **c.setpoints})

    head = [Candidate.default()]
    if base is not None and base.setpoints:
        head.append(base)
    singles = [over(a), over(b)]
    results = twin.screen([*head, *singles, over(both)], cycles=cycles)
    best = max(results, key=lambda r: r.mean_reward)
    by = {r.candidate: r for r in results}
    single = max(singles, key=lambda c: by[c.name].mean_reward)
    # The same twin and seed: the same batches and noise as above, paired against the single.
    paired = twin.screen([single, over(both)], cycles=cycles)[1]
    est, se = paired.vs_first, paired.vs_first_se
    z = NormalDist().inv_cdf(confidence)
    conf = NormalDist().cdf((est - margin) / se) if se > 0 else float(est > margin)
    return Combination(
        results=tuple(results),
        best=best.candidate,
        combined=both.name,
        single=single.name,
        estimate=est,
        se=se,
        bound=est - z * se,
        confidence=conf,
        confidence_level=confidence,
        margin=margin,
    )


# --------------------------------------------------------------------------- persistence


class CompetitionStore:
    """Competitions in SQLite (``<home>/competitions.db``); one short transaction per write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS competitions (id INTEGER PRIMARY KEY, ts REAL NOT NULL,"
            " grp TEXT NOT NULL, task TEXT NOT NULL, champion TEXT NOT NULL,"
            " challenger TEXT NOT NULL, decision TEXT NOT NULL, body TEXT NOT NULL)"
        )
        self._db.commit()

    def add(self, record: Competition) -> int:
        body = json.dumps(record.as_dict(), default=str)
        with self._db:
            cur = self._db.execute(
                "INSERT INTO competitions (ts, grp, task, champion, challenger, decision, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.ts,
                    record.group,
                    record.task,
                    record.champion,
                    record.challenger,
                    record.decision,
                    body,
                ),
            )
        return int(cur.lastrowid or 0)

    def list(self, group: str | None = None) -> list[Competition]:
        sql = "SELECT id, body FROM competitions"
        params: tuple[str, ...] = ()
        if group is not None:
            sql, params = sql + " WHERE grp = ?", (group,)
        out = []
        for rid, body in self._db.execute(sql + " ORDER BY id", params).fetchall():
            raw = json.loads(body)
            raw["id"] = int(rid)
            out.append(Competition(**raw))
        return out

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CompetitionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
