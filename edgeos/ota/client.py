"""The gateway side: find, download and install updates through python-tuf's ngclient.

Trust starts at the root metadata installed at provisioning (``ota.trusted_root``). Every
check builds a fresh :class:`tuf.ngclient.Updater` over the metadata cache in the state dir,
so TUF's rules apply on each run: root rotation walks the signed chain, versions never go
backwards (rollback / fast-forward), expired metadata is refused (freeze), lengths and hashes
of everything downloaded are checked (endless data, bit flips, mix-and-match of metadata).

On top of TUF the client checks what TUF cannot know: the bundle is for this hardware, is newer
than the device's version floor, has a sane version number, and its manifest is exactly the
one named in the signed target metadata.

Slow retrieval: ngclient's default fetcher only bounds the gap between bytes, which a server
sending one byte every few seconds never exceeds. :class:`GuardedFetcher` also enforces a
minimum average speed after a grace period, reading with ``read1`` so a trickle cannot hold a
single read open.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig  # type: ignore[attr-defined]

from edgeos.errors import UpdateError
from edgeos.httppost import PostFailed, post_sealed
from edgeos.ota.slots import SlotManager
from edgeos.ota.state import InstallResult
from edgeos_protocol.bundle import BundleKind, ProgressCallback, channel_path
from edgeos_protocol.control import ControlKind, counter_from_time, seal_control
from edgeos_protocol.crypto import Keyring
from edgeos_protocol.outcome import FetchError, Reason, Rejected, Version

__all__ = ["CheckResult", "ClientSettings", "GuardedFetcher", "Offer", "OtaClient"]


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the repository is, who this device is, and how patient downloads are."""

    repository_url: str
    trusted_root: Path
    cache_dir: Path
    hardware: str
    group: str = "default"
    #: Longest silence between two received bytes (also the connect timeout).
    socket_timeout_s: float = 15.0
    #: Minimum average download speed once ``speed_grace_s`` has passed (bytes/s).
    min_speed_bps: float = 4096.0
    speed_grace_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Offer:
    """A bundle the repository wants this device's group to run, verified by TUF metadata."""

    kind: str
    version: str
    target_path: str
    manifest_sha256: str
    length: int
    info: Any  # tuf.api.metadata.TargetFile


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What happened for one bundle kind during :meth:`OtaClient.check_and_install`."""

    kind: str
    status: str  # none | up_to_date | installed | skipped | rejected | failed
    version: str | None = None
    reason: str | None = None
    detail: str = ""
    restart_required: bool = False


class GuardedFetcher(FetcherInterface):
    """ngclient fetcher with a gap timeout *and* a minimum average speed."""

    def __init__(
        self,
        *,
        socket_timeout_s: float = 15.0,
        min_speed_bps: float = 4096.0,
        speed_grace_s: float = 10.0,
        chunk_size: int = 64 << 10,
    ) -> None:
        self._timeout = urllib3.Timeout(connect=socket_timeout_s, read=socket_timeout_s)
        self._min_speed = min_speed_bps
        self._grace = speed_grace_s
        self._chunk = chunk_size
        self._pool = urllib3.PoolManager(retries=urllib3.Retry(total=2, read=0, redirect=0))

    def close(self) -> None:
        self._pool.clear()

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._pool.request("GET", url, preload_content=False, timeout=self._timeout)
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.TimeoutError):
                raise tuf_errors.SlowRetrievalError(f"{url}: {exc.reason}") from exc
            raise tuf_errors.DownloadError(f"{url}: {exc.reason}") from exc
        if response.status >= 400:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
        return self._chunks(url, response)

    def _chunks(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        start = time.monotonic()
        received = 0
        complete = False
        try:
            while True:
                block = response.read1(self._chunk)
                if not block:
                    complete = True
                    return
                received += len(block)
                yield block
                elapsed = time.monotonic() - start
                if elapsed > self._grace and received / elapsed < self._min_speed:
                    raise tuf_errors.SlowRetrievalError(
                        f"{url}: {received} bytes in {elapsed:.1f} s is below "
                        f"{self._min_speed:g} B/s"
                    )
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_errors.SlowRetrievalError(f"{url}: no data for too long") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        finally:
            if not complete:
                # Never drain a hostile stream (it may be endless): drop the connection.
                response.close()
            response.release_conn()


def translate(exc: Exception) -> UpdateError:
    """Map python-tuf and transport errors onto the edgeos tree (the one place it happens)."""
    if isinstance(exc, UpdateError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return Rejected(Reason.UNSIGNED, text)
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return Rejected(Reason.EXPIRED, text)
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        # "Expected X vN, got vM": a file does not match what its parent signed (mixed
        # releases); "must be >=": an older version than already trusted (rollback).
        reason = Reason.MIX_AND_MATCH if text.startswith("Expected") else Reason.ROLLBACK
        return Rejected(reason, text)
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return Rejected(Reason.HASH_MISMATCH, text)
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return Rejected(Reason.TOO_LONG, text)
    if isinstance(exc, tuf_errors.SlowRetrievalError):
        return Rejected(Reason.SLOW, text)
    if isinstance(exc, tuf_errors.RepositoryError):
        return Rejected(Reason.MALFORMED, text)
    if isinstance(exc, tuf_errors.DownloadError | OSError):
        return FetchError(Reason.NETWORK, text)
    return Rejected(Reason.MALFORMED, text)


class OtaClient:
    """Checks the repository for this device's group and installs what it finds."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.metadata_dir = settings.cache_dir / "metadata"
        self.download_dir = settings.cache_dir / "downloads"

    @contextlib.contextmanager
    def _session(self) -> Iterator[Updater]:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        fetcher = GuardedFetcher(
            socket_timeout_s=self.settings.socket_timeout_s,
            min_speed_bps=self.settings.min_speed_bps,
            speed_grace_s=self.settings.speed_grace_s,
        )
        base = self.settings.repository_url.rstrip("/")
        try:
            updater = Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=f"{base}/metadata/",
                target_dir=str(self.download_dir),
                target_base_url=f"{base}/targets/",
                fetcher=fetcher,
                config=UpdaterConfig(app_user_agent="edgeos-ota"),
                bootstrap=self.settings.trusted_root.read_bytes(),
            )
            updater.refresh()
            yield updater
        except UpdateError:
            raise
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            fetcher.close()

    def _find(self, updater: Updater, kind: str) -> Offer | None:
        s = self.settings
        pointer_info = updater.get_targetinfo(channel_path(s.group, s.hardware, kind))
        if pointer_info is None:
            return None
        if pointer_info.length > 4096:
            raise Rejected(Reason.MALFORMED, "channel pointer is implausibly large")
        pointer_file = Path(
            updater.download_target(
                pointer_info, filepath=str(self.download_dir / f"channel-{kind}.json")
            )
        )
        pointer = json.loads(pointer_file.read_bytes())
        pointer_file.unlink()
        info: TargetFile | None = updater.get_targetinfo(str(pointer["target"]))
        if info is None:
            raise Rejected(Reason.MALFORMED, f"channel names unknown target {pointer['target']}")
        meta = (info.custom or {}).get("edgeos") if isinstance(info.custom, dict) else None
        if not isinstance(meta, dict):
            raise Rejected(Reason.MALFORMED, f"{info.path} lacks edgeos metadata")
        if meta.get("hardware") != s.hardware:
            raise Rejected(
                Reason.WRONG_HARDWARE,
                f"{info.path} is for {meta.get('hardware')!r}, this device is {s.hardware!r}",
            )
        if meta.get("kind") != kind:
            raise Rejected(Reason.WRONG_KIND, f"{info.path} is a {meta.get('kind')} bundle")
        version = str(Version.parse(str(meta["version"])))
        if str(pointer.get("version")) != str(meta.get("version")):
            raise Rejected(Reason.MIX_AND_MATCH, "channel and target disagree on the version")
        return Offer(kind, version, info.path, str(meta["manifest_sha256"]), info.length, info)

    def find(self, kind: BundleKind = "full") -> Offer | None:
        """The bundle this device's group should run for ``kind`` (``None``: nothing published)."""
        with self._session() as updater:
            return self._find(updater, kind)

    def check_and_install(
        self,
        slots: SlotManager,
        *,
        kinds: Sequence[BundleKind] = ("full", "config", "models"),
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> list[CheckResult]:
        """Look for each kind in turn; install the first newer full/config bundle (then stop:
        the device must restart into it) and any newer models bundle.

        Refusals are recorded in the slot state (``last_failure``, ``last_outcome``) so they
        reach ``ota status`` and the campaign report; the active slot is never touched.
        """
        results: list[CheckResult] = []
        try:
            with self._session() as updater:
                for kind in kinds:
                    result = self._check_one(updater, slots, kind, force=force, progress=progress)
                    results.append(result)
                    if result.restart_required:
                        break
        except Rejected as error:
            # The metadata itself was refused (unsigned, expired, rolled back, …).
            slots.record_rejection("metadata", None, error)
            results.append(CheckResult("metadata", "rejected", None, error.reason, error.detail))
        return results

    def _check_one(
        self,
        updater: Updater,
        slots: SlotManager,
        kind: BundleKind,
        *,
        force: bool,
        progress: ProgressCallback | None,
    ) -> CheckResult:
        offer: Offer | None = None
        try:
            offer = self._find(updater, kind)
            if offer is None:
                return CheckResult(kind, "none")
            floor = slots.read_state().floors.get(kind)
            if floor is not None and Version.parse(offer.version) == Version.parse(floor):
                return CheckResult(kind, "up_to_date", offer.version)
            slots.check_offer(kind, self.settings.hardware, offer.version, force=force)
            if kind != "models" and slots.read_state().trial is not None:
                return CheckResult(kind, "none", offer.version, detail="a trial is running")
            path = Path(
                updater.download_target(
                    offer.info,
                    filepath=str(self.download_dir / Path(offer.target_path).name),
                )
            )
            try:
                installed: InstallResult = slots.install(
                    path, expected_digest=offer.manifest_sha256, force=force, progress=progress
                )
            finally:
                path.unlink(missing_ok=True)
            return CheckResult(
                kind, "installed", installed.version, restart_required=installed.restart_required
            )
        except Exception as exc:
            error = translate(exc)
            if isinstance(error, FetchError):
                raise error from exc
            if isinstance(error, Rejected) and error.reason is Reason.PREVIOUSLY_FAILED:
                # Already reported when its trial failed; do not re-report on every check.
                return CheckResult(
                    kind,
                    "skipped",
                    offer.version if offer else None,
                    error.reason.value,
                    error.detail,
                )
            slots.record_rejection(kind, offer.version if offer else None, error)
            status = "rejected" if isinstance(error, Rejected) else "failed"
            reason = getattr(error, "reason", None)
            return CheckResult(
                kind,
                status,
                offer.version if offer else None,
                str(reason) if reason else None,
                getattr(error, "detail", str(error)),
            )

    def report_outcome(self, slots: SlotManager, device_id: str, keyring: Keyring) -> bool:
        """Send the latest unreported outcome to the repository's ``/reports`` endpoint.

        The report is a control message of kind ``OTA_REPORT`` sealed under the device key
        (``keyring.current``), so the repository accepts it only from this device, once
        (its counter is the time in µs); its fields are cut to the repository's bounds.
        """
        state = slots.read_state()
        if state.outcome_reported or state.last_outcome is None:
            return False
        outcome = state.last_outcome
        doc = {
            "device": device_id,
            "group": self.settings.group,
            "hardware": self.settings.hardware,
            "outcome": outcome.get("outcome"),
            "version": str(outcome.get("version", ""))[:64],
            "reason": None if outcome.get("reason") is None else str(outcome["reason"])[:64],
            "detail": str(outcome.get("detail", ""))[:1024],
            "at": None if outcome.get("at") is None else str(outcome["at"])[:40],
        }
        body = seal_control(
            ControlKind.OTA_REPORT,
            doc,
            keyring.current,
            device_id,
            counter_from_time(0, time.time()),
            key_id=keyring.current_id,
            created_us=int(time.time() * 1e6),
        )
        try:
            post_sealed(
                f"{self.settings.repository_url.rstrip('/')}/reports",
                body,
                timeout_s=self.settings.socket_timeout_s,
            )
        except PostFailed as exc:
            if exc.status is None:
                raise FetchError(Reason.NETWORK, f"cannot report outcome: {exc}") from exc
            raise FetchError(Reason.NETWORK, f"report refused: HTTP {exc.status}") from None
        slots.mark_reported()
        return True
