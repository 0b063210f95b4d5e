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

Canaries: the given ones, else the first member (sorted) not already running the winner — the
line that found it has the most evidence for it and is the least informative canary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from edgeos_cloud.fleet.competition import CompetitionStore, Winner, decide
from edgeos_cloud.fleet.config import FleetConfig
from edgeos_cloud.fleet.evidence import Tyre, load_tyres, tyres_of_device
from edgeos_cloud.fleet.groups import GroupDirectory
from edgeos_cloud.fleet.rollout import Rollout, RolloutRefused, Rollouts

if TYPE_CHECKING:
    from edgeos_cloud.models.lifecycle import Lifecycle

__all__ = ["LoopStep", "run_once", "start_rollout"]


@dataclass(frozen=True, slots=True)
class LoopStep:
    """What one step did: ``action`` is ``watched``, ``no-winner``, ``started`` or ``refused``."""

    group: str
    action: str
    reason: str
    winner: dict[str, Any] | None = None
    rollout: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
) -> LoopStep:
    """One step of the loop for ``group`` (see the module docstring)."""
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
    with CompetitionStore(config.home / "competitions.db") as store:
        winner = decide(
            group, champion, tyres, config.competition, challengers=challengers, store=store
        )
        recorded = store.list(group)[-1:] if winner is None else []
    if winner is None:
        why = recorded[0].reason if recorded else "no challenger"
        return LoopStep(group, "no-winner", why)
    if hardware is None:
        info = next((g for g in directory.groups() if g.name == group), None)
        hardware = info.hardware[0] if info is not None and info.hardware else None
    if hardware is None:
        return LoopStep(group, "refused", "hardware of the group unknown", winner.as_dict())
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
        return LoopStep(group, "refused", str(exc), winner.as_dict())
    return LoopStep(group, "started", r.name, winner.as_dict(), asdict(r))
