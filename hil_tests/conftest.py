"""HIL rig fixtures: ``--rig FILE`` (default: loopback simulated line), ``--soak DURATION``,
``--report-dir DIR``; a report (JSON + Markdown) is written at the end of every run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeos_testing.mosquitto import mosquitto_path
from edgeos_testing.report import Outcome, write_report
from edgeos_testing.rig import Credentials, Rig
from edgeos_testing.rigspec import RigSpec, load_rig, parse_duration

HERE = Path(__file__).parent
pytest_plugins = ["edgeos_testing.leaks"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop rig")
    group.addoption("--rig", default=str(HERE / "rigs" / "loopback.toml"), help="rig file (TOML)")
    group.addoption(
        "--soak", default=None, help="soak duration (e.g. 1h, 30m); default: short mode only"
    )
    group.addoption(
        "--soak-fault-every",
        type=float,
        default=120.0,
        help="seconds between faults in soak mode (default 120)",
    )
    group.addoption(
        "--soak-tracemalloc",
        type=int,
        default=0,
        help="soak: run the runtime with PYTHONTRACEMALLOC=N and dump heap snapshots",
    )
    group.addoption("--report-dir", default=str(HERE / "reports"), help="where reports go")


class Report:
    """Outcomes of the run's scenarios, written as JSON + Markdown at the end."""

    def __init__(self, spec: RigSpec, mode: str) -> None:
        self.doc: dict[str, Any] = {
            "rig": dataclasses.asdict(spec),
            "mode": mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "scenarios": {},
        }

    def add(self, outcome: Outcome) -> None:
        self.doc["scenarios"][outcome.name] = outcome.as_dict()


@pytest.fixture(scope="session")
def rig_spec(request: pytest.FixtureRequest) -> RigSpec:
    return load_rig(request.config.getoption("--rig"))


@pytest.fixture(scope="session")
def soak_s(request: pytest.FixtureRequest) -> float | None:
    text = request.config.getoption("--soak")
    return None if text is None else parse_duration(text)


@pytest.fixture(scope="session")
def hil_report(
    request: pytest.FixtureRequest, rig_spec: RigSpec, soak_s: float | None
) -> Iterator[Report]:
    report = Report(rig_spec, "short" if soak_s is None else f"soak {soak_s:.0f} s")
    yield report
    report.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    json_path, md_path = write_report(Path(request.config.getoption("--report-dir")), report.doc)
    print(f"\nHIL report: {json_path}\n{md_path.read_text(encoding='utf-8')}")


@pytest.fixture(scope="session")
def credentials(rig_spec: RigSpec, tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """One receiver CA and one provisioned device for the whole run (real CLIs)."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    return Credentials.provision(tmp_path_factory.mktemp("pki"), rig_spec.dut.device_id)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    rig_spec: RigSpec, credentials: Credentials, request: pytest.FixtureRequest
) -> AsyncIterator[RigFactory]:
    """``await make_rig(**options)``: a started rig, always torn down (processes killed)."""
    rigs: list[Rig] = []

    async def factory(**kwargs: Any) -> Rig:
        spec = kwargs.pop("spec", rig_spec)
        rig = Rig(spec, credentials=credentials, **kwargs)
        rigs.append(rig)
        await rig.__aenter__()
        return rig

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for rig in rigs:
        await rig.close()
        if failed is not None and failed.failed:
            print(f"rig work directory kept for post-mortem: {rig.workdir}")
        else:
            rig.remove_workdir()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# Leak checks come from the edgeos_testing.leaks plugin (pytest_plugins above).
