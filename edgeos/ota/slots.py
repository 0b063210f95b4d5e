"""A/B slots: install into the inactive slot, boot the new one on trial, commit or fall back.

Layout under the OTA root (``<device.state_dir>/<ota.slots_dir>``, by default
``/var/lib/edgeos/slots``)::

    state.json            which slot is active, which is on trial, boot attempts, version
                          floors, last failure; replaced atomically (temp, fsync, rename, fsync)
    current -> a          symlink the service starts from; repointed by the boot check only
    a/, b/                complete, verified trees, each with its own manifest.json
    .staging-b/           an install in progress (deleted by the next install or boot check)
    models/<version>/     models-only updates, side by side; models/current -> the newest
    health.json           written by the runtime (see :class:`HealthFile`)

State machine (every arrow is one atomic state write; a crash between arrows leaves the
previous state, which is always bootable)::

    committed(a) ──install b──► trial(b, attempts=0) ──boot check──► trial(b, attempts=n)
         ▲                            │                                 │   │
         │ fail_trial / attempts≥max  └─────────────────────────────────┘   │ healthy for the
         └────────────────── rolled back (a stays active) ◄─────────────────┤ whole window
                                                                            ▼
                                                                committed(b), floor=version(b)

The version floor lives in ``state.json`` (outside the slots) and only rises. After a commit
the boot check never starts a slot below it, and the installer refuses any bundle at or below
it, so an old release cannot come back even if its bytes are still on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeos.ota.health import HealthFile, HealthReport
from edgeos.ota.install import compose_config_slot, install_wheelhouse, verify_tree
from edgeos.ota.state import (
    HISTORY,
    BootDecision,
    InstallResult,
    SlotName,
    SlotState,
    now_iso,
    other_slot,
)
from edgeos_protocol.bundle import Manifest, ProgressCallback, extract_bundle, read_manifest
from edgeos_protocol.fsutil import (
    atomic_write_json,
    crash_point,
    fsync_dir,
    read_json,
    replace_symlink,
    rmtree_quiet,
)
from edgeos_protocol.outcome import InstallError, Reason, Rejected, Version

# HealthFile and HealthReport stay importable from here for the runtime (edgeos.app).
__all__ = ["HealthFile", "HealthReport", "ModelsHook", "SlotManager"]

#: Called with the directory of freshly installed models (the inference engine's hook).
ModelsHook = Callable[[Path], None]


class SlotManager:
    """Owns the OTA root: installs, boot checks, commits and rollbacks.

    One instance per process; mutating calls take an exclusive ``flock`` on ``<root>/.lock``
    so a timer-driven ``ota check`` and a boot check never interleave (the kernel drops the
    lock when a process dies, so a crash never leaves it held).
    """

    def __init__(
        self,
        root: Path,
        *,
        hardware: str,
        max_attempts: int = 3,
        full_verify_at_boot: bool = True,
        models_hook: ModelsHook | None = None,
        config_check: Callable[[Path], None] | None = None,
    ) -> None:
        self.root = Path(root)
        #: Re-validates a config bundle against this gateway's own file before composing.
        self.config_check = config_check
        self.hardware = hardware
        self.max_attempts = max_attempts
        self.full_verify_at_boot = full_verify_at_boot
        self.models_hook = models_hook
        self.slots_dir = self.root
        self.models_dir = self.root / "models"
        self.state_path = self.root / "state.json"
        self.current_link = self.root / "current"
        self.health_path = self.root / "health.json"

    # ------------------------------------------------------------------ state

    def slot_path(self, slot: SlotName) -> Path:
        return self.slots_dir / slot

    def read_state(self) -> SlotState:
        """Current state; a missing file means a fresh device (slot ``a``, nothing committed)."""
        try:
            return SlotState.from_json(read_json(self.state_path))
        except FileNotFoundError:
            return SlotState()

    def _write_state(self, state: SlotState) -> None:
        atomic_write_json(self.state_path, state.to_json())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def status(self) -> dict[str, Any]:
        """State plus what is on disk, for ``edgeos ota status``."""
        state = self.read_state()
        slots: dict[str, Any] = {}
        for name in ("a", "b"):
            manifest, problems = verify_tree(self.slot_path(name), full=False)
            slots[name] = {
                "version": manifest.version if manifest else None,
                "components": dict(manifest.components) if manifest else {},
                "intact": manifest is not None and not problems,
            }
        return {
            "root": str(self.root),
            "hardware": self.hardware,
            **state.to_json(),
            "slots": slots,
        }

    # ------------------------------------------------------------------ checks

    def check_offer(self, kind: str, target: str, version: str, *, force: bool = False) -> None:
        """Refuse a bundle this device must not install (hardware, rollback, failed before)."""
        if target != self.hardware:
            raise Rejected(
                Reason.WRONG_HARDWARE,
                f"bundle is built for {target!r}, this device is {self.hardware!r}",
            )
        parsed = Version.parse(version)
        state = self.read_state()
        floor = state.floors.get(kind)
        if floor is not None and parsed <= Version.parse(floor):
            raise Rejected(
                Reason.ROLLBACK,
                f"{kind} {parsed} is not newer than the version floor {floor}",
            )
        if not force and f"{kind}:{parsed}" in state.failed:
            raise Rejected(
                Reason.PREVIOUSLY_FAILED,
                f"{kind} {parsed} already failed its trial on this device",
            )

    def record_rejection(self, kind: str, version: str | None, error: Exception) -> None:
        """Remember why an offered update was refused, for ``ota status`` and the campaign."""
        reason = getattr(error, "reason", Reason.MALFORMED)
        detail = getattr(error, "detail", str(error))
        with self._locked():
            state = self.read_state()
            self._write_state(
                replace(
                    state,
                    last_failure=f"{reason}: {detail}",
                    last_outcome={
                        "outcome": "rejected",
                        "version": f"{kind}:{version or '?'}",
                        "reason": str(reason),
                        "detail": detail,
                        "at": now_iso(),
                    },
                    outcome_reported=False,
                ).with_event("rejected", version=version, reason=f"{reason}: {detail}")
            )

    # ------------------------------------------------------------------ provisioning

    def provision(self, bundle: Path) -> InstallResult:
        """Factory install: put a full bundle into slot ``a`` and commit it without a trial."""
        with self._locked():
            if self.state_path.exists():
                raise InstallError(Reason.IO_ERROR, f"{self.root} is already provisioned")
            self.slots_dir.mkdir(parents=True, exist_ok=True)
            manifest = read_manifest(bundle)
            if manifest.kind != "full":
                raise Rejected(Reason.WRONG_KIND, "provisioning needs a full bundle")
            self.check_offer(manifest.kind, manifest.target, manifest.version)
            staging = self.slots_dir / ".staging-a"
            rmtree_quiet(staging)
            rmtree_quiet(self.slot_path("a"))
            try:
                extract_bundle(bundle, staging)
                install_wheelhouse(staging)
            except BaseException:
                rmtree_quiet(staging)
                raise
            os.rename(staging, self.slot_path("a"))
            fsync_dir(self.slots_dir)
            state = SlotState(
                active="a",
                committed_version=manifest.version,
                floors=dict(manifest.components),
            ).with_event("provisioned", slot="a", version=manifest.version)
            self._write_state(state)
            replace_symlink(self.current_link, "a")
            return InstallResult("full", manifest.version, "a", self.slot_path("a"), False)

    # ------------------------------------------------------------------ install

    def install(
        self,
        bundle: Path,
        *,
        expected_digest: str | None = None,
        quota_bytes: int | None = None,
        reserve_bytes: int = 16 << 20,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> InstallResult:
        """Verify and install a bundle; full and config bundles go to the inactive slot.

        On any failure the inactive slot area is cleaned and the state is untouched: the
        active slot never changes here. Success for a full/config bundle leaves the new slot
        on trial (``restart_required``); a models bundle is live at once (hook called).
        """
        with self._locked():
            manifest = read_manifest(bundle)
            if expected_digest is not None and manifest.digest() != expected_digest:
                raise Rejected(
                    Reason.MIX_AND_MATCH,
                    "bundle manifest differs from the one named in the signed metadata",
                )
            self.check_offer(manifest.kind, manifest.target, manifest.version, force=force)
            free = shutil.disk_usage(self.root).free
            need = manifest.total_size + reserve_bytes
            if free < need:
                raise InstallError(
                    Reason.NO_SPACE, f"need {need} bytes (bundle + reserve), {free} free"
                )
            if manifest.kind == "models":
                return self._install_models(
                    bundle, manifest, expected_digest, quota_bytes, progress
                )
            state = self.read_state()
            if state.trial is not None:
                raise InstallError(
                    Reason.IO_ERROR,
                    f"slot {state.trial} is still on trial; commit or roll back first",
                )
            return self._install_slot(
                bundle,
                manifest,
                state,
                expected_digest=expected_digest,
                quota_bytes=quota_bytes,
                progress=progress,
            )

    def _install_slot(
        self,
        bundle: Path,
        manifest: Manifest,
        state: SlotState,
        *,
        expected_digest: str | None,
        quota_bytes: int | None,
        progress: ProgressCallback | None,
    ) -> InstallResult:
        target: SlotName = other_slot(state.active)
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        crash_point("install.begin")
        self._clean_leftovers()
        staging = self.slots_dir / f".staging-{target}"
        try:
            if manifest.kind == "config":
                composed = compose_config_slot(
                    bundle,
                    staging,
                    active=self.slot_path(state.active),
                    unpack=self.slots_dir / ".staging-config",
                    expected_digest=expected_digest,
                    quota_bytes=quota_bytes,
                    check_config=self.config_check,
                )
            else:
                composed = extract_bundle(
                    bundle,
                    staging,
                    expected_digest=expected_digest,
                    quota_bytes=quota_bytes,
                    progress=progress,
                    on_file=lambda _n: crash_point("install.file"),
                )
            crash_point("install.extracted")
            if manifest.kind == "full":
                # Dependencies for the target: unpacked from the verified wheelhouse into the
                # staging slot, so a wheel that does not install leaves the slot untouched.
                install_wheelhouse(staging)
                crash_point("install.wheels")
            final = self.slot_path(target)
            trash = self.slots_dir / f".trash-{target}"
            if final.exists():
                os.rename(final, trash)
                fsync_dir(self.slots_dir)
                crash_point("install.old_moved")
            os.rename(staging, final)
            fsync_dir(self.slots_dir)
            crash_point("install.in_place")
            rmtree_quiet(trash)
        except BaseException:
            rmtree_quiet(staging)
            raise
        new_state = replace(
            state, trial=target, attempts=0, trial_version=composed.version
        ).with_event(
            "installed",
            slot=target,
            version=composed.version,
            kind=manifest.kind,
            bundle_version=manifest.version,
        )
        self._write_state(new_state)
        crash_point("install.switched")
        return InstallResult(manifest.kind, manifest.version, target, final, True)

    def _install_models(
        self,
        bundle: Path,
        manifest: Manifest,
        expected_digest: str | None,
        quota_bytes: int | None,
        progress: ProgressCallback | None,
    ) -> InstallResult:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        version = str(manifest.parsed_version)
        staging = self.models_dir / f".staging-{version}"
        final = self.models_dir / version
        rmtree_quiet(staging)
        try:
            extract_bundle(
                bundle,
                staging,
                expected_digest=expected_digest,
                quota_bytes=quota_bytes,
                progress=progress,
            )
            if final.exists():
                rmtree_quiet(final)
            os.rename(staging, final)
            fsync_dir(self.models_dir)
        except BaseException:
            rmtree_quiet(staging)
            raise
        link = self.models_dir / "current"
        previous = os.readlink(link) if link.is_symlink() else None
        replace_symlink(link, version)
        if self.models_hook is not None:
            try:
                self.models_hook(final)
            except Exception as exc:
                # The engine could not load them: point back so a restart does not load them.
                if previous is not None:
                    replace_symlink(link, previous)
                raise InstallError(Reason.HEALTH, f"models hook refused {version}: {exc}") from exc
        state = self.read_state()
        floors = {**state.floors, "models": version}
        self._write_state(
            replace(
                state,
                floors=floors,
                models_version=version,
                last_outcome={
                    "outcome": "committed",
                    "version": f"models:{version}",
                    "at": now_iso(),
                },
                outcome_reported=False,
            ).with_event("models_updated", version=version)
        )
        self._prune_models(keep={version, previous or ""})
        return InstallResult("models", version, None, final, False)

    def _prune_models(self, keep: set[str]) -> None:
        for child in self.models_dir.iterdir():
            if child.name not in keep and child.name != "current" and not child.is_symlink():
                rmtree_quiet(child)

    def _clean_leftovers(self) -> None:
        if not self.slots_dir.is_dir():
            return
        for child in self.slots_dir.iterdir():
            if child.name.startswith((".staging-", ".trash-")):
                rmtree_quiet(child)

    # ------------------------------------------------------------------ boot

    def boot_check(self) -> BootDecision:
        """Run before the service starts: count a trial attempt or fall back, pick a slot.

        Always ends with ``current`` pointing at a slot that verifies against its manifest,
        or returns ``ok=False`` (and the unit fails to start) when no such slot exists.
        """
        with self._locked():
            events: list[str] = []
            try:
                state = self.read_state()
            except (OSError, ValueError) as exc:
                events.append(f"state file unreadable ({exc}); rebuilt from the slots")
                state = self._rebuild_state()
                self._write_state(state)
            self._clean_leftovers()

            if state.trial is not None:
                trial = state.trial
                trial_manifest, problems = self._verify(trial)
                if state.attempts >= self.max_attempts:
                    state = self._roll_back(
                        state,
                        Reason.CRASH_LOOP,
                        f"{state.trial_version} did not become healthy "
                        f"in {state.attempts} boot attempt(s)",
                    )
                    events.append(f"rolled back from slot {trial}: {state.last_failure}")
                elif trial_manifest is None or problems:
                    state = self._roll_back(
                        state, Reason.CORRUPT_SLOT, f"slot {trial} does not verify: {problems[:3]}"
                    )
                    events.append(f"rolled back from slot {trial}: {state.last_failure}")
                else:
                    state = replace(state, attempts=state.attempts + 1)
                    self._write_state(state)
                    crash_point("boot.counted")
                    events.append(
                        f"booting slot {trial} ({trial_manifest.version}) on trial, "
                        f"attempt {state.attempts}/{self.max_attempts}"
                    )
                    replace_symlink(self.current_link, trial)
                    return BootDecision(
                        True,
                        trial,
                        self.slot_path(trial),
                        trial_manifest.version,
                        True,
                        state.attempts,
                        trial_manifest.entry,
                        tuple(events),
                    )

            active = state.active
            manifest, problems = self._verify(active)
            if manifest is None or problems:
                events.append(f"active slot {active} does not verify: {problems[:3]}")
                other = other_slot(active)
                other_manifest, other_problems = self._verify(other)
                floor = state.floors.get("full")
                allowed = other_manifest is not None and (
                    floor is None or other_manifest.parsed_version >= Version.parse(floor)
                )
                if other_manifest is None or other_problems or not allowed:
                    events.append("no verified slot at or above the version floor; not starting")
                    return BootDecision(False, None, None, None, False, 0, None, tuple(events))
                state = replace(
                    state,
                    active=other,
                    last_failure=f"{Reason.CORRUPT_SLOT.value}: slot {active} damaged",
                ).with_event("recovered", slot=other, reason=Reason.CORRUPT_SLOT.value)
                self._write_state(state)
                active, manifest = other, other_manifest
                events.append(f"switched to slot {other}")
            replace_symlink(self.current_link, active)
            events.append(f"booting slot {active} ({manifest.version})")
            return BootDecision(
                True,
                active,
                self.slot_path(active),
                manifest.version,
                False,
                0,
                manifest.entry,
                tuple(events),
            )

    def _verify(self, slot: SlotName) -> tuple[Manifest | None, list[str]]:
        return verify_tree(self.slot_path(slot), full=self.full_verify_at_boot)

    def _rebuild_state(self) -> SlotState:
        best: tuple[Version, SlotName] | None = None
        slots: tuple[SlotName, ...] = ("a", "b")
        for slot in slots:
            manifest, problems = verify_tree(self.slot_path(slot))
            if manifest is not None and not problems:
                candidate = (manifest.parsed_version, slot)
                if best is None or candidate[0] > best[0]:
                    best = candidate
        if best is None:
            return SlotState()
        return SlotState(
            active=best[1], committed_version=str(best[0]), floors={"full": str(best[0])}
        )

    def _roll_back(self, state: SlotState, reason: Reason, detail: str) -> SlotState:
        kind, bundle_version = _trial_bundle(state)
        version = state.trial_version or "?"
        kind_version = f"{kind}:{bundle_version}"
        failure = f"{reason.value}: {detail}"
        new = replace(
            state,
            trial=None,
            attempts=0,
            trial_version=None,
            failed=(*state.failed, kind_version)[-HISTORY:],
            last_failure=failure,
            last_outcome={
                "outcome": "rolled_back",
                "version": version if kind == "full" else kind_version,
                "reason": reason.value,
                "detail": detail,
                "at": now_iso(),
            },
            outcome_reported=False,
        ).with_event("rolled_back", slot=state.trial, version=version, reason=failure)
        self._write_state(new)
        crash_point("rollback.written")
        return new

    # ------------------------------------------------------------------ trial end

    def commit(self) -> SlotState:
        """Make the trial slot the active one and raise the version floors to its versions."""
        with self._locked():
            state = self.read_state()
            if state.trial is None:
                raise InstallError(Reason.IO_ERROR, "no slot is on trial; nothing to commit")
            manifest, problems = verify_tree(self.slot_path(state.trial), full=False)
            if manifest is None or problems:
                raise InstallError(Reason.CORRUPT_SLOT, f"trial slot damaged: {problems[:3]}")
            trial_kind, bundle_version = _trial_bundle(state)
            # A campaign knows the bundle it published: a config bundle's own version.
            reported = manifest.version if trial_kind == "full" else f"config:{bundle_version}"
            floors = dict(state.floors)
            for kind, version in manifest.components.items():
                old = floors.get(kind)
                if old is None or Version.parse(version) > Version.parse(old):
                    floors[kind] = version
            crash_point("commit.begin")
            new = replace(
                state,
                active=state.trial,
                trial=None,
                attempts=0,
                trial_version=None,
                committed_version=manifest.version,
                floors=floors,
                last_outcome={
                    "outcome": "committed",
                    "version": reported,
                    "at": now_iso(),
                },
                outcome_reported=False,
            ).with_event("committed", slot=state.trial, version=manifest.version)
            self._write_state(new)
            crash_point("commit.written")
            return new

    def fail_trial(self, reason: Reason, detail: str) -> SlotState:
        """End the trial now (unhealthy); the next start boots the previous slot."""
        with self._locked():
            state = self.read_state()
            if state.trial is None:
                return state
            return self._roll_back(state, reason, detail)

    def mark_reported(self) -> None:
        """The latest outcome reached the repository; do not send it again."""
        with self._locked():
            state = self.read_state()
            if not state.outcome_reported:
                self._write_state(replace(state, outcome_reported=True))


def _trial_bundle(state: SlotState) -> tuple[str, str]:
    """``(kind, version)`` of the bundle the trial slot was installed from.

    A ``config`` bundle is composed into a slot at the active runtime's version (the slot's
    manifest version), so its own version — the one its campaign waits for — is only in the
    install record: outcomes report it as ``config:<version>`` (as models report
    ``models:<version>``), and a failed trial marks ``config:<version>`` as failed.
    """
    for record in reversed(state.history):
        if record.get("event") == "installed" and record.get("slot") == state.trial:
            if record.get("kind") == "config" and record.get("bundle_version"):
                return "config", str(record["bundle_version"])
            break
    return "full", state.trial_version or "?"
