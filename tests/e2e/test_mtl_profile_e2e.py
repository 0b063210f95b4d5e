"""Mesh twin learning end to end with a *declared* winner (issue #17): a new rubber, a hotter
start on one line, the competition on the stored tyres, a staged config rollout with trials,
and a gateway provisioned afterwards that starts with it.

Real parts only (:mod:`edgeos_testing.fleetrig`): Mosquitto, ``edgeos-receiver run``, a served
TUF repository taking sealed OTA reports, and per gateway ``edgeos sim`` + ``edgeos run`` with
the committed models, the guard (α = 0.005) and OTA on, slots provisioned with a stub release.

The rubber: ``p ~ N(1.5, 0.15²)`` (the plant's usual compound is N(0, 1)) whose lab Mooney reads
20 MU higher — a compound the correction model never saw: its inputs are outside the training
range, so every guard takes the plant recipe (160 °C, 15 bar), which is too cold for it. Line A
gets it from the start; B and C 8 simulated seconds later (``edgeos sim --material-…``). A's
engineer tries a hotter start — profile ``press-line@1``, ``heater.sp`` 164.5 °C as the default
recipe — published to A's channel only and trialled there (A boots into the config slot and
commits after its health window). Nothing is handed over from here on:

1. the fleet loop's step (:func:`edgeos_cloud.fleet.loop.run_once`, as the timer runs it) reads
   the stored tyres, stratified by raw-material class (Mooney bin), until the competition
   declares ``correction@1.0.0|press-line@1`` better than the champion ``…|-`` with 95 %
   one-sided confidence, and starts the rollout: the profile validated against every member's
   ``config_summary``, its ``config`` bundle signed into the TUF repository, canary B first;
2. B installs it (``ota check``), restarts into the trial slot, commits after its health window
   and reports; the watch (:meth:`Rollouts.step`) sees the commit and B's tyres since the
   rollout no worse than before, within its α budget → the group stage: A and C do the same;
3. D, enrolled afterwards (:class:`~edgeos_cloud.fleet.bootstrap.Bootstrap`), gets the group's
   profile at its first ``config_summary`` and runs it after its first ``ota check``;
4. every guard's slack ≥ 0 and Σr ≥ (1 − α) Σd over every gateway's stored tyres.

The watch runs with a 0.4 MPa margin over ≥ 4 tyres per member: the judge compares a member's
mean reward under the winner with its mean before, unpaired — on line A, which already ran the
winner, the same policy twice — and a fresh batch's first tyres cost ≈ 0.5 MPa whatever the
policy; a regression as large as the winner's gain (0.6–1 MPa here) still halts it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgeos_cloud.fleet.bootstrap import Bootstrap
from edgeos_cloud.fleet.competition import CompetitionStore
from edgeos_cloud.fleet.config import CompetitionSettings, FleetConfig, GroupOverride
from edgeos_cloud.fleet.evidence import Tyre, tyres_of_device
from edgeos_cloud.fleet.groups import GroupDirectory
from edgeos_cloud.fleet.loop import LoopStep, run_once
from edgeos_cloud.fleet.rollout import Rollouts
from edgeos_cloud.ota.repository import OtaRepository
from edgeos_cloud.receiver.storage import open_storage
from edgeos_protocol.bundle import BundleSources, build_bundle
from edgeos_protocol.profile import PROFILE_FILE, Profile, Tunables
from edgeos_testing.fleetprofiles import pointer
from edgeos_testing.fleetrig import HARDWARE, FleetGateway, FleetRig
from edgeos_testing.mosquitto import mosquitto_path
from edgeos_testing.procs import exe, run_cli

MODELS = Path(__file__).resolve().parents[2] / "models"
CHAMPIONS = {t: MODELS / f"{t}.toml" for t in ("anomaly", "correction", "quality")}
GROUP = "press-line"
ALPHA = 0.005
NESTS = 4
HOT = 164.5
RUBBER = ("1.5", "0.15", "20")
NEW_RUBBER = ["--material-mean", RUBBER[0], "--material-std", RUBBER[1], "--mooney-offset", RUBBER[2]]  # fmt: skip
LATER = [
    "--material-change-after-s", "8", "--material-mean-after", RUBBER[0],
    "--material-std-after", RUBBER[1], "--mooney-offset-after", RUBBER[2],
]  # fmt: skip
CHAMPION = "correction@1.0.0|-"
CHALLENGER = "correction@1.0.0|press-line@1"
pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")


def _hotter_start() -> Profile:
    setpoints = {f"nest{n:02d}.heater.sp": HOT for n in range(1, NESTS + 1)}
    return Profile(
        name="press-line", version=1, source="gw-a", tunables=Tunables(setpoints=setpoints)
    )


def _config_bundle(profile: Profile, version: str, work: Path) -> Path:
    src = work / f"profile-{version}" / "config"
    src.mkdir(parents=True)
    (src / Path(PROFILE_FILE).name).write_bytes(profile.canonical())
    return build_bundle("config", version, HARDWARE, BundleSources(config=src), work / "dist")


def _applied(rig: FleetRig, device: str, key: str) -> bool:
    return any(e.get("profile") == key for e in rig.events(device, "profile_applied"))


async def _trial(rig: FleetRig, gw: FleetGateway) -> None:
    """``ota check`` installs the config bundle its channel points at; restart into the trial
    slot; commit after the health window and report to the campaign."""
    results = await asyncio.to_thread(rig.ota_check, gw)
    installed = [r for r in results if r.get("kind") == "config" and r["status"] == "installed"]
    assert installed and installed[0]["restart_required"], results
    await asyncio.to_thread(rig.restart, gw)
    await asyncio.to_thread(rig.commit, gw)


@pytest.mark.timeout(900)  # above the sum of its bounded waits: the rig always closes
async def test_a_better_profile_is_declared_from_stored_tyres_and_adopted_by_the_group(
    tmp_path: Path,
) -> None:
    t_test = time.monotonic()
    profile = _hotter_start()
    async with FleetRig(tmp_path / "rig") as rig:
        fleet_home = tmp_path / "fleet"
        rollouts = Rollouts(rig.repo_dir, fleet_home)
        # A's engineer: the profile into the fleet's store and onto A's channel only.
        rollouts.store.put(profile)
        repo = OtaRepository(rig.repo_dir)
        repo.publish(_config_bundle(profile, "1", tmp_path), groups=["gw-a"])

        async with asyncio.TaskGroup() as tg:
            started_a = tg.create_task(
                rig.add_gateway(
                    "gw-a", seed=1, models=CHAMPIONS, nests=NESTS, sim_args=NEW_RUBBER,
                    update_first=True,
                )
            )  # fmt: skip
            for device, seed in (("gw-b", 2), ("gw-c", 3)):
                tg.create_task(
                    rig.add_gateway(
                        device, seed=seed, models=CHAMPIONS, nests=NESTS, sim_args=LATER
                    )
                )
        gw_a = started_a.result()
        marks = {"gateways_started": time.monotonic() - t_test}
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.to_thread(rig.commit, gw_a))  # A's own trial
            await rig.wait_until(
                "fingerprint reports",
                lambda: all(rig.events(d, "fleet_fingerprint") for d in ("gw-a", "gw-b", "gw-c")),
                timeout_s=120,
            )
        assert rig.slot_status(gw_a)["trial"] is None  # committed
        assert _applied(rig, "gw-a", "press-line@1")
        # The running runtime exports the set-point it applies (edgeos profile export).
        exported = json.loads(
            await asyncio.to_thread(
                run_cli,
                [exe("edgeos"), "profile", "export", "--json", "--config", str(gw_a.config)],
            )
        )
        assert exported["tunables"]["setpoints"] == {k: HOT for k in profile.tunables.setpoints}

        (fp,) = rig.events("gw-a", "fleet_fingerprint")[:1]
        fleet = FleetConfig(
            home=fleet_home,
            storage_url=rig.storage_url,
            ota_repo=rig.repo_dir,
            groups={GROUP: GroupOverride(fingerprints=(fp["key"],))},
            competition=CompetitionSettings(
                min_tyres=12, min_per_stratum=4, min_strata=1, strata=("material",)
            ),
        )
        storage = open_storage(rig.storage_url)
        try:
            assert GroupDirectory(storage, fleet).members(GROUP) == ["gw-a", "gw-b", "gw-c"]

            def tyres(device: str) -> list[Tyre]:
                return list(tyres_of_device(storage, device, with_material=False))

            # 1. The loop's step on the stored tyres until the competition declares a winner.
            steps: list[LoopStep] = []

            def declared() -> bool:
                step = run_once(
                    fleet, storage, GROUP, champion=CHAMPION, challengers=[CHALLENGER],
                    canaries=["gw-b"], hardware=HARDWARE, alpha=ALPHA,
                )  # fmt: skip
                steps.append(step)
                assert step.action in ("no-winner", "started"), step
                return step.action == "started"

            await rig.wait_until("the competition declares a winner", declared, timeout_s=300)
            started = time.monotonic()
            marks["declared"] = started - t_test
            winner: dict[str, Any] = steps[-1].winner or {}
            assert winner["winner"] == CHALLENGER and winner["profile"] == "press-line@1"
            assert winner["champion"] == CHAMPION and winner["model"] is None
            assert winner["confidence"] >= 0.95 and winner["bound"] > 0.0, winner
            with CompetitionStore(fleet_home / "competitions.db") as store:
                decisions = [c.decision for c in store.list(GROUP)]
            assert decisions[-1] == "winner" and "winner" not in decisions[:-1]
            rollout = steps[-1].rollout or {}
            name, target = rollout["name"], rollout["target"]
            assert rollout["kind"] == "profile" and rollout["canaries"] == ["gw-b"]
            assert pointer(rollouts.repo, "gw-b", "config") == target
            assert pointer(rollouts.repo, "gw-c", "config") is None

            # 2. Canary B: install, trial, commit, report → the watch advances to the group.
            gw = rig.gateways
            c_early = await asyncio.to_thread(rig.ota_check, gw["gw-c"])
            assert not [x for x in c_early if x.get("status") == "installed"], c_early
            await _trial(rig, gw["gw-b"])

            def stepped(status: str) -> bool:
                step = rollouts.step(name, tyres, min_tyres=4, margin=0.4)
                assert step.status != "halted", step.reason
                return step.status == status

            await rig.wait_until("canary B judged healthy", lambda: stepped("group"), timeout_s=150)
            marks["canary_done"] = time.monotonic() - t_test
            assert _applied(rig, "gw-b", "press-line@1")
            assert pointer(rollouts.repo, "gw-c", "config") == target
            async with asyncio.TaskGroup() as tg:
                for device in ("gw-a", "gw-c"):
                    tg.create_task(_trial(rig, gw[device]))
            await rig.wait_until("the group judged healthy", lambda: stepped("done"), timeout_s=150)
            adopted = time.monotonic()
            marks["group_done"] = adopted - t_test
            assert rollouts.current(GROUP) == {"config": target}

            # 3. A gateway provisioned afterwards starts with the group's profile.
            bootstrap = Bootstrap(rollouts)
            bootstrap.enroll("gw-d", GROUP)
            gw_d = await rig.add_gateway(
                "gw-d", seed=4, models=CHAMPIONS, nests=NESTS, sim_args=NEW_RUBBER
            )
            await rig.wait_until(
                "D's first summary", lambda: bool(rig.events("gw-d", "config_summary")),
                timeout_s=90,
            )  # fmt: skip
            (enrolment,) = await asyncio.to_thread(bootstrap.step, storage, ["gw-d"])
            assert enrolment.state == "done" and enrolment.config == target, enrolment
            await _trial(rig, gw_d)
            await rig.wait_until(
                "D runs the profile", lambda: _applied(rig, "gw-d", "press-line@1"), timeout_s=60
            )

            marks["bootstrapped"] = time.monotonic() - t_test

            # 4. No gateway's α budget was broken (their guards, and the stored tyres).
            for device, g in rig.gateways.items():
                guard = (await asyncio.to_thread(rig.status, g))["guard"]
                assert guard["slack"] >= 0.0, (device, guard)
                settled = tyres(device)
                rewards = sum(t.reward for t in settled)
                defaults = sum(t.default_reward for t in settled)
                assert rewards >= (1.0 - ALPHA) * defaults - 1e-9, (device, rewards, defaults)
            by_policy: dict[str, list[float]] = {}
            for device in ("gw-a", "gw-b", "gw-c"):
                for t in tyres(device):
                    by_policy.setdefault(t.policy, []).append(t.reward)
        finally:
            storage.close()
    figures = {
        "time_to_fleet_adoption_s": round(adopted - started, 1),
        "scenario_s": round(time.monotonic() - t_test, 1),
        "winner": {k: winner[k] for k in ("estimate", "bound", "confidence", "evidence")},
        "competitions": len(steps),
        "phases_s": {k: round(v, 1) for k, v in marks.items()},
        "mean_reward": {p: round(sum(r) / len(r), 3) for p, r in by_policy.items()},
    }
    print(json.dumps(figures))
