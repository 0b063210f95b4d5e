"""One step of the fleet loop for a group: evidence → competition → rollout → watch.

:func:`run_once` is idempotent and meant for a timer (``edgeos-cloud fleet run-once --group G``):

1. **watch** — a rollout of the group still in flight (``canary``/``group``) is stepped
   (:meth:`Rollouts.step`: the campaign's authenticated OTA reports, then the canaries' tyres
   and α budget from the receiver database); nothing new starts while one is in flight;
2. **decide** — the group's tyres (:func:`~edgeos_cloud.fleet.evidence.load_tyres`) go through
   the competition (:func:`~edgeos_cloud.fleet.competition.decide`, recorded in
   ``competitions.db``);
3. **roll out** the :class:`~edgeos_cloud.fleet.competition.Winner`:

   * a **profile** winner (``name@version``, stored in the profile store — e.g. exported from
     the line that found it and ``put`` there) → its ``config`` bundle, validated against every
     member's ``config_summary`` (:meth:`Rollouts.start_profile`);
   * a **model** winner (``task@version`` in the model registry, ``qualified`` by the gate) →
     a ``models`` bundle published *without* the lifecycle's one-stage campaign
     (:func:`~edgeos_cloud.models.publish.publish_challenger_bundle`; the version becomes the
     group's challenger) and the fleet's staged campaign (:meth:`Rollouts.start_model`), canary
     first; a halt re-publishes the previous champion through :meth:`Lifecycle.rollback`.

   Before a **profile** winner goes out, its combination with a partner is screened
   (:func:`screen_winners`): when the same step also declared a second profile winner, or a
   strong runner-up (a ``tie`` whose confidence is at least ``runner_up_confidence``), and the
   two change *different* set-points (line A's start temperature, line B's pressure), the
   combined profile (the winner's tunables plus the partner's set-point changes, a new version
   of the winner's family) is validated against every member's summary, then screened in the
   group's twin simulator (calibrated from its stored tyres unless given) against both, the
   champion and the plant default with common random numbers
   (:func:`~edgeos_cloud.fleet.competition.screen`). The combination is rolled out only when
   the twin says it beats the better single winner with the competition's confidence and
   margin; otherwise the winner is. A combination that sets a set-point both change, that a
   target's hard limits refuse, or that the twin cannot play is ``refused`` with the reason,
   and the winner goes out. Either way the screening is a ``combination`` record in
   ``competitions.db``, and the rollout path is the same.

Canaries: the given ones, else the first member (sorted) not already running the winner — the
line that found it has the most evidence for it and is the least informative canary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from edgeos_cloud.fleet.competition import (
    Combination,
    Competition,
    CompetitionStore,
    Contest,
    Winner,
    contest,
    screen,
)
from edgeos_cloud.fleet.config import FleetConfig
from edgeos_cloud.fleet.evidence import Tyre, load_tyres, split_policy, tyres_of_device
from edgeos_cloud.fleet.groups import GroupDirectory
from edgeos_cloud.fleet.profiles import ProfilesRefused, ProfileStore
from edgeos_cloud.fleet.rollout import Rollout, RolloutRefused, Rollouts
from edgeos_cloud.fleet.twinsim import DEFAULT_RECIPE, Candidate, TwinSimulator
from edgeos_protocol.profile import Profile, Tunables

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["LoopStep", "Screened", "run_once", "screen_winners", "start_rollout"]

#: A ``tie`` at least this confident counts as a strong runner-up worth combining.
RUNNER_UP_CONFIDENCE = 0.8


@dataclass(frozen=True, slots=True)
class LoopStep:
    """What one step did: ``action`` is ``watched``, ``no-winner``, ``started`` or ``refused``;
    ``screening`` is the step's ``combination`` record, when it screened one."""

    group: str
    action: str
    reason: str
    winner: dict[str, Any] | None = None
    rollout: dict[str, Any] | None = None
    screening: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Screened:
    """A screening's record (with its id) and the winner to roll out: the combination's, or
    the rule's own when the combination was not better or was refused."""

    record: Competition
    winner: Winner


class _NoCombination(ValueError):
    pass


def _recipe(profile: Profile | None) -> dict[str, float]:
    """A profile's set-points as one line-wide recipe by tag suffix (``heater.sp``)."""
    out: dict[str, float] = {}
    if profile is None:
        return out
    for name, value in sorted(profile.tunables.setpoints.items()):
        _, dot, suffix = name.partition(".")
        key = suffix if dot else name
        if key in out and out[key] != value:
            raise _NoCombination(
                f"{profile.name}@{profile.version} sets {key} differently on different nests: "
                "the twin plays one recipe per line"
            )
        out[key] = value
    return out


def _changes(recipe: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in recipe.items() if base.get(k, DEFAULT_RECIPE.get(k)) != v}


def _profile(store: ProfileStore, key: str) -> Profile:
    name, _, number = key.partition("@")
    try:
        return store.version(name, int(number))
    except (KeyError, ValueError, OSError) as exc:
        raise _NoCombination(f"profile {key} is not in the profile store") from exc


def _other_tunables(t: Tunables) -> Tunables:
    return t.model_copy(update={"setpoints": {}})


def _combined_profile(
    store: ProfileStore,
    a: Profile,
    b: Profile,
    b_changes: dict[str, float],
    champion: Profile | None,
) -> Profile:
    """``a``'s tunables with ``b``'s set-point changes, as a version of ``a``'s family (the
    version already holding exactly these tunables, when there is one: the step stays
    idempotent)."""
    others = _other_tunables(b.tunables)
    if others not in (
        _other_tunables(a.tunables),
        _other_tunables(champion.tunables if champion else Tunables()),
    ):
        raise _NoCombination(
            f"{b.name}@{b.version} changes more than set-points: only set-point changes combine"
        )
    moved = {
        tag: v
        for tag, v in b.tunables.setpoints.items()
        if (tag.partition(".")[2] or tag) in b_changes
    }
    tunables = a.tunables.model_copy(update={"setpoints": {**a.tunables.setpoints, **moved}})
    candidate = a.model_copy(update={"tunables": tunables})
    latest = store.latest(a.name)
    for version in range(1, (latest.version if latest else 0) + 1):
        try:
            known = store.version(a.name, version)
        except KeyError:
            continue
        if known.tunables_digest() == candidate.tunables_digest():
            return known
    source = f"combination of {a.name}@{a.version} and {b.name}@{b.version} (twin-screened)"
    return candidate.model_copy(
        update={"version": store.next_version(a.name), "source": source[:256]}
    )


def _partners(result: Contest, winner: Winner, runner_up_confidence: float) -> list[Competition]:
    model = split_policy(winner.winner)[0]
    out = []
    for rec in result.records:
        if rec.challenger == winner.winner or rec.task != "profile":
            continue
        if split_policy(rec.challenger)[0] != model:
            continue
        if rec.decision == "winner" or (
            rec.decision == "tie" and (rec.confidence or 0.0) >= runner_up_confidence
        ):
            out.append(rec)
    return sorted(out, key=lambda r: -(r.bound if r.bound is not None else -math.inf))


def screen_winners(
    config: FleetConfig,
    profiles: ProfileStore,
    store: CompetitionStore,
    result: Contest,
    *,
    members: Sequence[str],
    twin: TwinSimulator | Callable[[], TwinSimulator],
    runner_up_confidence: float = RUNNER_UP_CONFIDENCE,
    now: float | None = None,
) -> Screened | None:
    """Screen the combination of ``result``'s profile winner with its strongest partner whose
    set-point changes are different (see the module docstring); ``None`` when there is nothing
    to combine (a model winner, no second winner or strong runner-up). The screening is
    recorded in ``store``; ``twin`` is the group's twin or a function that calibrates it."""
    winner = result.winner
    if winner is None or winner.model is not None or winner.profile is None:
        return None
    partners = _partners(result, winner, runner_up_confidence)
    if not partners:
        return None
    cfg = config.competition
    model = split_policy(winner.winner)[0]
    ts = time.time() if now is None else now
    champion_key = split_policy(winner.champion)[1]
    settings: dict[str, Any] = {
        "twin": config.twin.model_dump(mode="json"),
        "confidence": cfg.confidence,
        "margin": cfg.margin,
        "runner_up_confidence": runner_up_confidence,
    }
    details: dict[str, Any] = {"winner": winner.profile, "champion": champion_key}
    refusals: list[str] = []
    chosen: tuple[Competition, Profile, dict[str, float], dict[str, float]] | None = None
    combo_name = ""
    try:
        champion = _profile(profiles, champion_key) if champion_key != "-" else None
        a = _profile(profiles, winner.profile)
        base = _recipe(champion)
        a_changes = _changes(_recipe(a), base)
        for rec in partners:
            b_key = split_policy(rec.challenger)[1]
            combo_name = f"{winner.profile}+{b_key}"
            try:
                b = _profile(profiles, b_key)
                b_changes = _changes(_recipe(b), base)
                both = sorted(set(a_changes) & set(b_changes))
                if both or not a_changes or not b_changes:
                    what = f"both change {both}" if both else "one changes no set-point"
                    raise _NoCombination(
                        f"{winner.profile} and {b_key}: {what}: not a combination of different "
                        "set-points"
                    )
                chosen = (rec, b, a_changes, b_changes)
                break
            except _NoCombination as exc:
                refusals.append(str(exc))
        if chosen is None:
            raise _NoCombination("; ".join(refusals))
        rec, b, a_changes, b_changes = chosen
        b_key = f"{b.name}@{b.version}"
        details |= {
            "partner": b_key,
            "partner_decision": rec.decision,
            "competitions": [winner.competition_id, rec.id],
            "base": base,
            "changes": {winner.profile: a_changes, b_key: b_changes},
        }
        combined = _combined_profile(profiles, a, b, b_changes, champion)
        combined_key = f"{combined.name}@{combined.version}"
        details["profile"] = combined_key
        try:
            profiles.require_fit(combined, members)
        except ProfilesRefused as exc:
            raise _NoCombination(f"{combined_key} ({combo_name}): {exc}") from exc
        try:
            the_twin = twin if isinstance(twin, TwinSimulator) else twin()
        except (ValueError, OSError) as exc:
            raise _NoCombination(f"the group's twin could not be calibrated: {exc}") from exc
        details["twin_params"] = the_twin.params.as_dict()
        try:
            combo = screen(
                Candidate(winner.profile, a_changes),
                Candidate(b_key, b_changes),
                the_twin,
                cycles=config.twin.cycles,
                base=Candidate(champion_key, base) if champion is not None else None,
                confidence=cfg.confidence,
                margin=cfg.margin,
            )
        except ValueError as exc:  # a set-point the twin cannot play (cure time, …)
            raise _NoCombination(f"the twin cannot screen {combo_name}: {exc}") from exc
    except _NoCombination as exc:
        record = Competition(
            group=winner.group,
            task="combination",
            champion=winner.champion,
            challenger=f"{model}|{combo_name or winner.profile}",
            decision="refused",
            reason=f"combination refused: {exc}; {winner.profile} goes out alone",
            estimate=None,
            se=None,
            bound=None,
            confidence=None,
            naive=None,
            strata=0,
            evidence={},
            settings=settings,
            ts=ts,
            screening=details,
        )
        rid = store.add(record)
        return Screened(Competition(**{**asdict(record), "id": rid}), winner)
    record, out = _screening_record(
        winner,
        model=model,
        combined=combined,
        combo=combo,
        details=details,
        settings=settings,
        ts=ts,
        combo_name=combo_name,
    )
    rid = store.add(record)
    record = Competition(**{**asdict(record), "id": rid})
    if out is None:
        return Screened(record, winner)
    if _digest_of(profiles, combined) is None:
        profiles.put(combined)
    return Screened(record, _combination_winner(winner, model, combined, combo, rid))


def _digest_of(store: ProfileStore, profile: Profile) -> str | None:
    try:
        return store.version(profile.name, profile.version).digest()
    except KeyError:
        return None


def _combination_winner(
    winner: Winner, model: str, combined: Profile, combo: Combination, rid: int
) -> Winner:
    key = f"{combined.name}@{combined.version}"
    return Winner(
        group=winner.group,
        task="profile",
        winner=f"{model}|{key}",
        champion=winner.champion,
        model=None,
        profile=key,
        estimate=combo.estimate,
        bound=combo.bound,
        confidence=combo.confidence,
        evidence={r.candidate: r.tyres for r in combo.results},
        strata=0,
        competition_id=rid,
    )


def _screening_record(
    winner: Winner,
    *,
    model: str,
    combined: Profile,
    combo: Combination,
    details: dict[str, Any],
    settings: dict[str, Any],
    ts: float,
    combo_name: str,
) -> tuple[Competition, Profile | None]:
    key = f"{combined.name}@{combined.version}"
    level = f"{combo.confidence_level:g}"
    if combo.combined_better:
        decision = "combined"
        reason = (
            f"{combo_name} beats {combo.single} in the twin by {combo.estimate:.4f} per tyre "
            f"(lower bound {combo.bound:.4f} > margin {combo.margin:g} at {level}); "
            f"rolled out as {key}"
        )
    else:
        decision = "single"
        reason = (
            f"{combo_name} is not better than {combo.single} with confidence in the twin "
            f"(estimate {combo.estimate:.4f}, lower bound {combo.bound:.4f} <= margin "
            f"{combo.margin:g} at {level}); {winner.profile} rolled out alone"
        )
    record = Competition(
        group=winner.group,
        task="combination",
        champion=winner.champion,
        # The pair, as the twin screened it; ``screening.profile`` names the version (stored
        # only when it is rolled out).
        challenger=f"{model}|{combo_name}",
        decision=decision,
        reason=reason,
        estimate=combo.estimate,
        se=combo.se,
        bound=combo.bound,
        confidence=round(combo.confidence, 6),
        naive=None,
        strata=0,
        evidence={r.candidate: r.tyres for r in combo.results},
        settings=settings,
        ts=ts,
        screening={
            **details,
            **combo.as_dict(),
            "rolled_out": key if combo.combined_better else winner.profile,
        },
    )
    return record, (combined if combo.combined_better else None)


def _canaries(winner: Winner, members: Sequence[str], tyres: Sequence[Tyre]) -> list[str]:
    latest: dict[str, str] = {}
    for t in tyres:  # oldest first: the last one seen is the policy in force
        latest[t.device] = t.policy
    others = [d for d in sorted(members) if latest.get(d) != winner.winner]
    return others[:1] or sorted(members)[:1]


def start_rollout(
    rollouts: Rollouts,
    winner: Winner,
    *,
    members: Sequence[str],
    canaries: Sequence[str],
    hardware: str,
    now_us: int,
    alpha: float = 0.005,
    lifecycle: Lifecycle | None = None,
) -> Rollout:
    """Publish ``winner`` and start its staged campaign (canary first); raises
    :class:`RolloutRefused`."""
    if winner.model is not None:
        if lifecycle is None:
            raise RolloutRefused(f"{winner.model}: a model winner needs the model lifecycle")
        from edgeos_cloud.models.errors import PublishRefused
        from edgeos_cloud.models.publish import publish_challenger_bundle

        repo_dir = rollouts.repo.dir
        try:
            version = lifecycle.registry.find(winner.model)
            published = publish_challenger_bundle(lifecycle, version, winner.group, repo_dir)
        except (PublishRefused, KeyError) as exc:
            raise RolloutRefused(f"{winner.model}: {exc}") from exc
        champion_model = winner.champion.partition("|")[0]
        return rollouts.start_model(
            winner.group,
            winner=winner.model,
            champion=champion_model,
            target=published["bundle"],
            members=members,
            canaries=canaries,
            hardware=hardware,
            now_us=now_us,
            alpha=alpha,
        )
    if winner.profile is None:
        raise RolloutRefused(f"winner {winner.winner!r} names neither a model nor a profile")
    name, _, number = winner.profile.partition("@")
    try:
        profile = rollouts.store.version(name, int(number))
    except (KeyError, ValueError, OSError) as exc:
        raise RolloutRefused(f"profile {winner.profile} is not in the profile store") from exc
    champion_key = winner.champion.partition("|")[2]
    champion = None
    if champion_key and champion_key != "-":
        cname, _, cnumber = champion_key.partition("@")
        try:
            champion = rollouts.store.version(cname, int(cnumber))
        except (KeyError, ValueError, OSError):
            champion = None  # nothing to roll back to but the file itself
    return rollouts.start_profile(
        winner.group,
        profile,
        members=members,
        canaries=canaries,
        hardware=hardware,
        champion=champion,
        now_us=now_us,
        alpha=alpha,
    )


def run_once(
    config: FleetConfig,
    storage: Any,
    group: str,
    *,
    champion: str,
    challengers: Sequence[str] | None = None,
    canaries: Sequence[str] | None = None,
    hardware: str | None = None,
    lifecycle: Lifecycle | None = None,
    min_tyres: int = 20,
    alpha: float = 0.005,
    now_us: int | None = None,
    twin: TwinSimulator | None = None,
    screen_combinations: bool = True,
    runner_up_confidence: float = RUNNER_UP_CONFIDENCE,
) -> LoopStep:
    """One step of the loop for ``group`` (see the module docstring).

    ``twin`` is the group's twin simulator for screening combinations; by default it is
    calibrated from the group's stored tyres (:func:`~edgeos_cloud.fleet.twinsim.
    calibrate_from_storage`), only when there is a combination to screen.
    """
    if config.ota_repo is None:
        raise RolloutRefused("no ota_repo in [fleet]: rollouts need the TUF repository")
    rollouts = Rollouts(config.ota_repo, config.home)
    rollouts.store.refresh_summaries(storage, GroupDirectory(storage, config).members(group))

    def tyres_of(device: str) -> list[Tyre]:
        return tyres_of_device(storage, device, target=config.target, with_material=False)

    in_flight = [r for r in rollouts.all() if r.group == group and r.status in ("canary", "group")]
    if in_flight:
        model_rollback = None
        if lifecycle is not None:
            lc = lifecycle

            def model_rollback(r: Rollout) -> str:
                task = r.winner.partition("@")[0]
                bundle: str = lc.rollback(task, r.group)["bundle"]
                return bundle

        stepped = [
            rollouts.step(r.name, tyres_of, min_tyres=min_tyres, model_rollback=model_rollback)
            for r in in_flight
        ]
        newest = stepped[-1]
        why = f"{newest.name}: {newest.status}"
        return LoopStep(group, "watched", why, rollout=asdict(newest))

    directory = GroupDirectory(storage, config)
    members = directory.members(group)
    if not members:
        return LoopStep(group, "no-winner", f"group {group!r} has no members")
    tyres = load_tyres(storage, members, target=config.target)

    def calibrated() -> TwinSimulator:
        from edgeos_cloud.fleet.twinsim import calibrate_from_storage

        params = calibrate_from_storage(config.storage_url, members, cycle_s=config.twin.cycle_s)
        return TwinSimulator(params, nests=config.twin.nests, seed=config.twin.seed)

    screened: Screened | None = None
    with CompetitionStore(config.home / "competitions.db") as store:
        result = contest(
            group, champion, tyres, config.competition, challengers=challengers, store=store
        )
        winner = result.winner
        if winner is not None and screen_combinations:
            screened = screen_winners(
                config,
                rollouts.store,
                store,
                result,
                members=members,
                twin=twin if twin is not None else calibrated,
                runner_up_confidence=runner_up_confidence,
            )
    if winner is None:
        why = result.records[-1].reason if result.records else "no challenger"
        return LoopStep(group, "no-winner", why)
    screening = None
    if screened is not None:
        winner, screening = screened.winner, screened.record.as_dict()
    if hardware is None:
        info = next((g for g in directory.groups() if g.name == group), None)
        hardware = info.hardware[0] if info is not None and info.hardware else None
    if hardware is None:
        why = "hardware of the group unknown"
        return LoopStep(group, "refused", why, winner.as_dict(), screening=screening)
    chosen = list(canaries) if canaries else _canaries(winner, members, tyres)
    started_us = now_us if now_us is not None else int(time.time() * 1e6)
    try:
        r = start_rollout(
            rollouts,
            winner,
            members=members,
            canaries=chosen,
            hardware=hardware,
            now_us=started_us,
            alpha=alpha,
            lifecycle=lifecycle,
        )
    except RolloutRefused as exc:
        return LoopStep(group, "refused", str(exc), winner.as_dict(), screening=screening)
    return LoopStep(group, "started", r.name, winner.as_dict(), asdict(r), screening)
