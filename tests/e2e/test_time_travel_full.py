"""Time travel on the real plumbing: a fleet must not go dark on a calendar date (issue #21).

The reduced version (``test_time_travel.py``) runs the gateway's renewal and uplink pieces in a
script; this one runs the products. libfaketime moves the wall clock of Mosquitto (TLS, CRL,
ACL), ``edgeos-cloud run`` (the receiver), ``edgeos-cloud ota serve --registry`` (TUF,
``/reports``, ``/certificates``), the gateway's ``edgeos run`` (``[ota]`` + ``[uplink.tls]``,
reading a simulated line) and every one-shot command: the shipped timers' commands
(``edgeos-cloud pki refresh …`` + the broker reload, ``edgeos ota check --report``), the
gateway unit's ``ExecStartPre`` boot check and the commit watcher (``edgeos_testing.timetravel``).

Day 0: a second device is provisioned, connects once, and is revoked (``device revoke`` and
the broker reload the docs prescribe). Then +31 days (CRL past its ``nextUpdate``), +1 year
(TUF targets long expired) and +3 years (broker, receiver and gateway certificates expired).
At each step, with the gateway stopped: the clock moves, the cloud timer runs, the receiver
restarts at the new date; then the gateway starts (boot check + run) and must

* connect and get its batches stored by the receiver (stored rows increase),
* have renewed its client certificate where due (its ``client.crt`` notAfter moved, by the
  runtime's own renewal task over ``POST /certificates``) and kept it otherwise,
* take an update: a config-only bundle published at that date is installed by the update
  timer's command into the other slot, booted on trial at the next start and committed by the
  commit watcher on the health the running gateway writes,

and the revoked device's TLS connection is refused, and so is its certificate request.

TUF root is given 5 years (no timer can re-sign root: an operator's ceremony, alerted ahead).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from edgeos_testing.clockjump import WallClock, faketime_library
from edgeos_testing.mosquitto import mosquitto_path
from edgeos_testing.timetravel import FakedFleet, cert_not_after

pytestmark = [
    pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed"),
    pytest.mark.skipif(faketime_library() is None, reason="libfaketime not installed"),
]

GATEWAY, REVOKED = "ttf-gw-1", "ttf-gw-revoked"
DAY = 86400.0
STEPS = [
    ("day 0", 0.0),
    ("+31 days", 31 * DAY),
    ("+1 year", 365 * DAY),
    ("+3 years", 3 * 365 * DAY),
]
RENEW_BEFORE_DAYS = 60


async def _until(what: str, check: Any, fleet: FakedFleet, timeout_s: float = 90.0) -> Any:
    """Poll ``check()`` (state held by other processes: files, a database) until truthy."""
    try:
        async with asyncio.timeout(timeout_s):
            while not (value := await asyncio.to_thread(check)):
                await asyncio.sleep(0.5)
            return value
    except TimeoutError:
        pytest.fail(f"{what} within {timeout_s:.0f} s; logs: {fleet.logs()}")


@pytest.mark.timeout(600)
async def test_gateway_delivers_renews_and_updates_while_revoked_device_stays_out_for_3_years(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    wall = WallClock(tmp_path)
    async with FakedFleet(
        tmp_path, wall, (GATEWAY, REVOKED), renew_before_days=RENEW_BEFORE_DAYS
    ) as fleet:
        assert fleet.dut is not None and fleet.broker is not None
        gw_cert = fleet.creds[GATEWAY] / "client.crt"
        # Day 0: the second device's credentials work; then it is revoked (+ broker reload).
        first = await asyncio.to_thread(fleet.probe, REVOKED, renew=False)
        assert first["connected"], first
        fleet.cloud_cli("device", "revoke", REVOKED, "--config", str(fleet.config))
        await asyncio.to_thread(fleet.broker.reload)

        rows = 0
        versions = ["1.0.0"]
        timeline: dict[str, dict[str, Any]] = {}
        for k, (label, offset) in enumerate(STEPS, start=1):
            if fleet.dut.running:
                await fleet.dut.stop()
            wall.set_offset(offset)
            refresh = await asyncio.to_thread(fleet.timer)
            await asyncio.to_thread(fleet.start_receiver)
            not_after = cert_not_after(gw_cert)
            due = not_after - (time.time() + offset) < RENEW_BEFORE_DAYS * DAY

            # The gateway starts at the new date, connects and delivers.
            await fleet.start_gateway()
            before = rows
            rows = await _until(
                f"{label}: batches stored",
                lambda before=before: (
                    (n := fleet.stored_rows(GATEWAY, at_most=before + 1)) > before and n
                ),
                fleet,
            )
            # Renewed where due (by the runtime's own task), untouched otherwise.
            if due:
                renewed = await _until(
                    f"{label}: client certificate renewed",
                    lambda na=not_after: cert_not_after(gw_cert) > na,
                    fleet,
                )
                assert renewed
                assert cert_not_after(gw_cert) - (time.time() + offset) > 700 * DAY
                # ... and it delivers with the new certificate.
                rows = await _until(
                    f"{label}: batches stored after the renewal",
                    lambda before=rows: (
                        (n := fleet.stored_rows(GATEWAY, at_most=before + 1)) > before and n
                    ),
                    fleet,
                )
            else:
                assert cert_not_after(gw_cert) == not_after, label

            # An update published at this date: installed into the other slot by the update
            # timer's command, booted on trial at the next start, committed on health.
            version = f"1.0.{k}"
            await asyncio.to_thread(fleet.publish, "config", version)
            active = fleet.ota_state()["active"]
            results = await asyncio.to_thread(fleet.update_check)
            config = [r for r in results if r["kind"] == "config"]
            assert config and config[0]["status"] == "installed", (label, results)
            assert config[0]["version"] == version, (label, results)
            await fleet.dut.stop()
            await fleet.start_gateway()
            trial = fleet.ota_state()
            assert trial["trial"] not in (None, active), (label, trial)
            await fleet.commit_watch()
            state = fleet.ota_state()
            # A config bundle composes a slot: the runtime's version stays, its config moves.
            assert state["trial"] is None and state["active"] != active, (label, state)
            assert state["slots"][state["active"]]["components"]["config"] == version, (
                label,
                state,
            )
            versions.append(version)

            # The revoked device: refused by the broker, and no certificate for it.
            out = await asyncio.to_thread(fleet.probe, REVOKED)
            assert not out["connected"], (label, out)
            assert not out["renewed"] and "HTTP 403" in out["renewal_error"], (label, out)
            assert fleet.stored_rows(REVOKED, at_most=1) == 0
            timeline[label] = {
                "changed": refresh["changed"],
                "stored_rows_at_least": rows,
                "renewed": due,
                "committed": version,
                "revoked": out.get("connect_error"),
            }

        # The timer's textfile for node_exporter says when each credential ends.
        metrics = fleet.textfile.read_text()
        for kind in ("crl", "server_certificate", "device_certificate", "tuf_timestamp"):
            assert f'kind="{kind}"' in metrics, metrics
        assert "crl" in timeline["+31 days"]["changed"]
        assert {"server_certificate", "receiver_certificate", "crl"} <= set(
            timeline["+3 years"]["changed"]
        )
        assert timeline["+3 years"]["renewed"], timeline
    print(f"full time travel took {time.monotonic() - started:.1f} s: {timeline}")
