"""Guarded actuation: apply a learned recipe only when it is safe *and* affordable.

After the safe-exploration idea of "Enhancing Digital Twins" (and the conservative-bandit
constraint of Wu et al., 2016): the plant's default policy gives baseline set-points, the
correction model proposes its own, and the guard decides per station and tyre.

**Hard safety.** Every value the guard emits passes :func:`edgeos.driver.check_write` for its
tag: writable, finite, inside the hard ``limits``, and within ``max_rate`` against the tag's
last write in a :class:`~edgeos.twin.WriteLog` (monotonic times). On the runtime that is the
twin's own record (:meth:`ActuationGuard.share_write_log`), so the guard and the desired-state
check measure the rate from the same write; standalone, the guard records its own decisions. A
learned proposal that fails → the default recipe. A default value that would break
``max_rate`` is ramped (the largest allowed step towards it); one outside the hard limits is
not written at all. Nothing unchecked leaves.

**Soft limits.** :attr:`GuardConfig.soft_limits` (the operator's file, or a configuration
profile's ``guard.soft_limits``) narrow where *learned* set-points may go, inside the hard
limits. A proposal outside them is refused — the default recipe is taken — rather than clamped:
the model's predicted outcome (and so the lower bound the budget counts) is for the value it
proposed, not for a clamped one. The default recipe is the plant's and is not bound by them.

**Budget.** Rewards are per tyre, ``r(e) = E* − |e − E*|`` (MPa, ``E*`` = perfect modulus).
Over the run so far the learned policy's realised reward may not fall more than ``α``
(:attr:`GuardConfig.alpha`) below what the default policy would have earned::

    Σ_t r_t  ≥  (1 − α) · Σ_t d_t

``r_t`` is the realised reward of the tyre. ``d_t`` is the default policy's reward: realised
when the default recipe was applied, and otherwise — the counterfactual nobody observed —
estimated *conservatively* as an upper confidence bound: the correction model's predicted
modulus under the default recipe ``ê_d``, widened to ``ê_d ± k·σ_d`` and scored with the
best reward in that interval (``σ_d`` from the manifest's closed-loop residuals). The learned
recipe is applied only if the constraint still holds when its own tyre is counted at a *lower*
bound (``ê_l ± k·σ_l``, worst reward in the interval) and the default at its upper bound, with
every tyre still in the press counted the same way. When measured tyres show the model's
residuals are larger than its manifest says, ``k`` is widened by the observed ratio, so the
bounds stay honest after the raw material drifts away from the training data.

**When in doubt, the default.** A decision taken on inputs that are not fully observed (the
caller passes ``doubt``: a cold start with unknown batch history, a load whose tags were not
yet consistent, inputs outside the model's training range) takes the default recipe: the model's
bounds say nothing about such inputs. A tyre is accounted by the set-points actually in force
during its cure: the caller reads them back when the cure starts (:meth:`ActuationGuard.confirm`)
and a tyre whose recipe is not the decided one (a write refused, failed or late) is counted
like an unobserved counterfactual, ``d`` at its upper bound, and while it is in the press at the
worst reward (0). Tyres are matched to their decision by the cycle counter they complete with.

**Operator switch.** :meth:`ActuationGuard.set_learning` turns learned actions off (or on) at
once; from the next decision every station gets the default recipe.

Every decision is counted and returned as an event (``type = "guard_decision"``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edgeos.config import AnyTag, GuardConfig
from edgeos.errors import WriteRefused
from edgeos.twin.desired import WriteLog

__all__ = ["ActuationGuard", "GuardDecision", "reward", "reward_bounds"]

Action = Literal["learned", "default"]
#: Calibration widens ``k`` only after this many measured learned tyres.
_CALIBRATION_MIN = 20


def reward(elasticity: float, target: float) -> float:
    """Reward of one tyre: the best modulus minus its distance from it."""
    return target - abs(elasticity - target)


def reward_bounds(predicted: float, width: float, target: float) -> tuple[float, float]:
    """Worst and best reward of a tyre whose modulus lies in ``predicted ± width``."""
    lo_e, hi_e = predicted - width, predicted + width
    worst = min(reward(lo_e, target), reward(hi_e, target))
    best = target if lo_e <= target <= hi_e else max(reward(lo_e, target), reward(hi_e, target))
    return worst, best


@dataclass(frozen=True, slots=True)
class GuardDecision:
    """What the guard decided for one station's next tyre."""

    station: str
    action: Action
    reason: str
    #: Values to write, by full tag name (already checked against the tags' limits).
    writes: Mapping[str, float]
    ts: float
    learned_lower: float
    default_upper: float
    slack: float

    def event(self) -> dict[str, Any]:
        return {
            "type": "guard_decision",
            "station": self.station,
            "action": self.action,
            "reason": self.reason,
            "writes": dict(self.writes),
            "ts": self.ts,
            "learned_lower": round(self.learned_lower, 4),
            "default_upper": round(self.default_upper, 4),
            "slack": round(self.slack, 4),
        }


@dataclass(slots=True)
class _Pending:
    action: Action
    default_upper: float
    learned_lower: float
    predicted: float
    sigma: float
    #: Cycle counter the tyre completes with (``None``: match the next tyre of the station).
    tyre: int | None = None
    writes: Mapping[str, float] | None = None
    #: The set-points read back at the cure start were the decided ones (None: not checked).
    in_force: bool | None = None


class ActuationGuard:
    """Decides, per station and tyre, between the learned proposal and the default recipe."""

    def __init__(
        self,
        config: GuardConfig,
        tags: Mapping[str, AnyTag],
        *,
        target: float,
        k: float = 2.0,
    ) -> None:
        self.config = config
        self.tags = dict(tags)
        self.target = target
        self.k = k
        self.learning_enabled = config.enabled
        #: Realised reward of every measured tyre (Σ r_t).
        self.realised = 0.0
        #: Default policy's reward for the same tyres (realised or upper bound) (Σ d_t).
        self.default_estimate = 0.0
        self.tyres = 0
        self.counts: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        #: Last write per tag, the reference for ``max_rate`` (monotonic times).
        self.writes = WriteLog()
        #: Standalone, a decided write counts as made; with a shared log its owner records.
        self._record_decisions = True
        # Calibration: squared standardised residuals of measured learned tyres.
        self._z2_sum = 0.0
        self._z_n = 0

    def share_write_log(self, writes: WriteLog) -> None:
        """Check ``max_rate`` against the runtime's record of writes (the twin's).

        Its owner records each write when it completes, so the guard stops recording its own
        decisions: the guard and the desired-state check then measure from the same write.
        """
        self.writes = writes
        self._record_decisions = False

    # ------------------------------------------------------------------ switches

    def set_learning(self, enabled: bool, *, ts: float, who: str = "operator") -> dict[str, Any]:
        """The operator switch; returns the event to log."""
        self.learning_enabled = enabled and self.config.enabled
        self.counts["switch_on" if enabled else "switch_off"] += 1
        return {
            "type": "guard_switch",
            "learning": self.learning_enabled,
            "requested": enabled,
            "by": who,
            "ts": ts,
        }

    @property
    def k_effective(self) -> float:
        """``k`` widened by the observed/declared residual ratio once enough tyres are measured."""
        if self._z_n < _CALIBRATION_MIN:
            return self.k
        return self.k * max(1.0, math.sqrt(self._z2_sum / self._z_n))

    @property
    def slack(self) -> float:
        """``Σ r − (1 − α) Σ d`` over measured tyres (≥ 0 while the budget holds)."""
        return self.realised - (1.0 - self.config.alpha) * self.default_estimate

    def _pending_slack(self) -> float:
        a = 1.0 - self.config.alpha
        total = 0.0
        for p in self._pending.values():
            if p.in_force is False:
                # Recipe unknown: worst reward (r ≥ 0 for any modulus up to 2·E*).
                total -= a * p.default_upper
            elif p.action == "learned":
                total += p.learned_lower - a * p.default_upper
            # A default tyre adds r − (1 − α)·r = α·r ≥ 0 whatever r is: counted as 0.
        return total

    # ------------------------------------------------------------------ decisions

    def decide(
        self,
        station: str,
        *,
        baseline: Mapping[str, float],
        proposal: Mapping[str, float] | None,
        predicted_default: float,
        sigma_default: float,
        predicted_learned: float,
        sigma_learned: float,
        now: float,
        doubt: str | None = None,
        tyre: int | None = None,
    ) -> GuardDecision:
        """Choose the recipe for ``station``'s next tyre.

        ``baseline`` and ``proposal`` map tag *suffixes* (``heater.sp``) to values; ``proposal``
        is ``None`` when there is no correction model. ``now`` is the monotonic time used for
        rate limits. ``doubt`` (why the inputs are not trustworthy) forces the default recipe.
        ``tyre`` is the cycle counter the tyre will complete with (see :meth:`settle`).
        """
        k = self.k_effective
        _, d_upper = reward_bounds(predicted_default, k * sigma_default, self.target)
        l_lower, _ = reward_bounds(predicted_learned, k * sigma_learned, self.target)
        a = 1.0 - self.config.alpha
        slack_after = self.slack + self._pending_slack() + l_lower - a * d_upper

        reason = ""
        writes: dict[str, float] | None = None
        if proposal is None:
            reason = "no correction model"
        elif not self.config.enabled:
            reason = "guarded actuation disabled in the configuration"
        elif not self.learning_enabled:
            reason = "learned actions switched off by the operator"
        elif doubt is not None:
            reason = f"inputs not fully observed: {doubt}"
            self.counts["doubt"] += 1
        elif not all(math.isfinite(v) for v in proposal.values()) or not (
            math.isfinite(l_lower) and math.isfinite(d_upper)
        ):
            reason = "proposal is not finite"
        elif slack_after < 0.0:
            reason = (
                f"budget: slack would be {slack_after:.3f} < 0 "
                f"(learned ≥ {l_lower:.3f} vs default ≤ {d_upper:.3f})"
            )
        else:
            try:
                writes = self._checked(station, proposal, now)
            except WriteRefused as exc:
                reason = f"limits: {exc.reason} ({exc.tag})"
        action: Action
        if writes is not None:
            action = "learned"
            reason = f"learned recipe within limits and budget (slack after {slack_after:.3f})"
        else:
            action = "default"
            writes = self._default_writes(station, baseline, now)
        if station in self._pending:
            # The tyre decided before was never measured (its counter step was not seen).
            self.counts["unsettled"] += 1
        self._pending[station] = _Pending(
            action, d_upper, l_lower, predicted_learned, sigma_learned, tyre, dict(writes)
        )
        self._commit(writes, now)
        self.counts[action] += 1
        self.counts["decisions"] += 1
        return GuardDecision(station, action, reason, writes, now, l_lower, d_upper, self.slack)

    def _checked(self, station: str, values: Mapping[str, float], now: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for suffix, value in values.items():
            name = f"{station}.{suffix}"
            tag = self.tags.get(name)
            if tag is None:
                raise WriteRefused(name, "no tag configuration (limits unknown)")
            soft = self.config.soft_limits.get(name)
            if soft is not None and not soft.min <= value <= soft.max:
                self.counts["soft_limit"] += 1
                raise WriteRefused(
                    name, f"{value:.4g} outside the soft limits [{soft.min:g}, {soft.max:g}]"
                )
            checked = self.writes.check(tag, value, now)
            assert not isinstance(checked, str | bool)
            out[name] = float(checked)
        return out

    def _default_writes(
        self, station: str, baseline: Mapping[str, float], now: float
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for suffix, value in baseline.items():
            name = f"{station}.{suffix}"
            tag = self.tags.get(name)
            if tag is None:
                self.counts["default_unconfigured"] += 1
                continue
            # Ramp: the largest step towards the default that max_rate allows.
            target = self.writes.ramp(tag, float(value), now)
            if target != float(value):
                self.counts["default_ramped"] += 1
            try:
                checked = self.writes.check(tag, target, now)
            except WriteRefused:
                self.counts["default_refused"] += 1
                continue
            assert not isinstance(checked, str | bool)
            out[name] = float(checked)
        return out

    def _commit(self, writes: Mapping[str, float], now: float) -> None:
        if self._record_decisions:
            for name, value in writes.items():
                self.writes.record(name, value, now)

    def confirm(self, station: str, in_force: Mapping[str, float]) -> bool | None:
        """The cure of ``station``'s tyre started with these set-points (full tag names).

        Returns whether they are the decided ones (``None``: no decision to check). A mismatch
        beyond half the tag's resolution makes the tyre count as an unobserved recipe.
        """
        p = self._pending.get(station)
        if p is None or p.writes is None or p.in_force is not None:
            return None
        ok = True
        for name, value in p.writes.items():
            seen = in_force.get(name)
            tag = self.tags.get(name)
            tol = 0.51 * (tag.effective_resolution if tag is not None else 0.0) + 1e-6
            if seen is None or not math.isfinite(seen) or abs(seen - value) > tol:
                ok = False
        p.in_force = ok
        if not ok:
            self.counts["not_in_force"] += 1
        return ok

    def observe_written(self, name: str, value: float, now: float) -> None:
        """Tell a standalone guard about a write made by someone else (an operator, a recipe
        change); ``now`` is monotonic. With a shared write log its owner already knows."""
        if self._record_decisions:
            self.writes.record(name, value, now)

    # ------------------------------------------------------------------ outcomes

    def settle(
        self, station: str, elasticity: float, tyre: int | None = None
    ) -> dict[str, Any] | None:
        """A tyre of ``station`` was measured; ``tyre`` is the cycle counter it completed with.

        It settles the station's pending decision when the counters match (or either is
        unknown). An older tyre (one that was in the press before the decision) leaves the
        decision pending; a newer one means the decided tyre was never measured, which is
        counted (``unsettled``) and dropped from the budget. Returns the ``guard_settled``
        event of an accounted tyre, else ``None``.
        """
        p = self._pending.get(station)
        if p is None:
            return None
        if p.tyre is not None and tyre is not None:
            ahead = (tyre - p.tyre) % 65536
            if ahead >= 32768:
                self.counts["older_tyre"] += 1
                return None
            if ahead:
                del self._pending[station]
                self.counts["unsettled"] += 1
                return None
        del self._pending[station]
        if not math.isfinite(elasticity):
            return None
        event: dict[str, Any] = {
            "type": "guard_settled",
            "station": station,
            "tyre": tyre,
            "action": p.action,
            "in_force": p.in_force,
            "elasticity": round(elasticity, 4),
        }
        r = reward(elasticity, self.target)
        self.realised += r
        self.tyres += 1
        if p.in_force is False:
            self.default_estimate += p.default_upper
        elif p.action == "learned":
            self.default_estimate += p.default_upper
            z = (elasticity - p.predicted) / max(p.sigma, 1e-9)
            self._z2_sum += z * z
            self._z_n += 1
            if r < p.learned_lower:
                self.counts["below_lower_bound"] += 1
        else:
            self.default_estimate += r
        event["slack"] = round(self.slack, 4)
        return event

    def stats(self) -> dict[str, Any]:
        return {
            "learning": self.learning_enabled,
            "alpha": self.config.alpha,
            "k_effective": round(self.k_effective, 4),
            "tyres": self.tyres,
            "realised_reward": round(self.realised, 4),
            "default_estimate": round(self.default_estimate, 4),
            "slack": round(self.slack, 4),
            "counts": dict(self.counts),
        }
