"""Adapter between the simulated tyre line (:mod:`edgeos_cloud.fleet.physics`) and inference.

Training (``models/train_all.py``), the tests and the benchmark step the line's physics
in-process, fast-forwarded, and read the same key tags a gateway would read from the twin. This
module keeps that glue in one place:

* :class:`SimLine` owns a :class:`~edgeos_cloud.fleet.physics.line.LinePhysics`, samples the
  :data:`~edgeos_protocol.features.KEY_SUFFIXES` columns of every nest, applies set-point
  writes by tag name, and builds the writable tags' :class:`~edgeos.config.TagConfig` (hard
  limits, ``max_rate``) from the simulator's layout so the guard checks the real limits;
* :func:`lagged_optimum` turns the simulator's *true* optimum into the set-points a station
  should be given at load time, compensating the platen's first-order lag (the label the
  correction model learns), and :func:`expected_elasticity` predicts the noise-free outcome of
  a recipe written at load time (labels for the model's outcome heads); both are the cloud's
  physics (:mod:`edgeos_cloud.fleet.physics.cure`), re-exported here.

* :meth:`SimLine.new_rubber` switches the line to a raw material the models were never told
  about (its lab Mooney reading relates differently to how it cures), the drift the cloud's
  model lifecycle must notice and retrain for;
* :class:`FleetRecorder` ships what a gateway on this line would ship — the key tags of every
  nest (``quality.elasticity`` is the realised modulus a press's QC measurement reports) and the
  engine's events — through the receiver's real ingest path (sealed with the wire format,
  opened, authenticated, decoded and stored by ``edgeos_cloud.receiver``), so the cloud's
  trainer and gate read the fleet's data the way they do in production.

The physics gives ground truth (hidden batch property, freshness, cycle records); nothing here
is used by the runtime on a device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from drivers.modbus import ModbusAddress
from edgeos.config import Limits, TagConfig
from edgeos_cloud.fleet.physics.cure import (
    E_BEST,
    expected_elasticity,
    lagged_optimum,
    reward,
)
from edgeos_cloud.fleet.physics.layout import KEY_TAG_COUNT, Layout, build_layout
from edgeos_cloud.fleet.physics.line import LinePhysics
from edgeos_cloud.fleet.physics.recipe import Setpoints, default_policy
from edgeos_protocol.features import KEY_SUFFIXES, SAMPLE_PERIOD_S

__all__ = [
    "E_BEST",
    "SETPOINT_SUFFIXES",
    "DriveLog",
    "FleetRecorder",
    "SimClock",
    "SimLine",
    "drive",
    "expected_elasticity",
    "lagged_optimum",
    "record_drifting_line",
    "record_run",
    "reward",
    "tyres",
]

F64 = npt.NDArray[np.float64]

_MOONEY_COL = KEY_SUFFIXES.index("batch.mooney")
#: Set-points the correction model and the guard act on.
SETPOINT_SUFFIXES: tuple[str, str] = ("heater.sp", "press.sp")


class SimLine:
    """A simulated line stepped in-process; reads and writes by tag name like a twin would."""

    def __init__(
        self,
        nests: int = 80,
        *,
        seed: int = 0,
        cycle_s: float = 40.0,
        noise: float = 1.0,
        batch_cycles: float = 12.0,
    ) -> None:
        # Key tags only: the auxiliary signals cost time and no model reads them.
        self.layout: Layout = build_layout(nests, KEY_TAG_COUNT)
        self.physics = LinePhysics(
            self.layout, seed=seed, cycle_s=cycle_s, noise=noise, batch_cycles=batch_cycles
        )
        self.nests = nests
        self.stations: tuple[str, ...] = tuple(
            self.layout.nest_name(n) for n in range(1, nests + 1)
        )
        self.key_index = np.array(
            [[self.layout.index(f"{s}.{k}") for k in KEY_SUFFIXES] for s in self.stations],
            dtype=np.intp,
        )
        #: Added to the served ``batch.mooney`` (see :meth:`new_rubber`).
        self.mooney_offset = 0.0

    def new_rubber(self, mooney_offset: float) -> None:
        """Switch to a new rubber type from the next load on (a new batch starts now).

        The new compound cures like the old one for the same hidden batch property, but its lab
        Mooney reading is ``mooney_offset`` higher: a model that learnt "Mooney → best cure" on
        the old compound now misjudges every tyre (it marks good tyres as bad), while the
        plant's outcomes (``quality.elasticity``) stay honest. That is what the cloud must
        notice from realised quality and retrain for.
        """
        self.physics.new_batch()
        self.mooney_offset = float(mooney_offset)

    @property
    def now(self) -> float:
        return self.physics.time_s

    def sample(self) -> F64:
        """Key tag values of every station, ``(nests, len(KEY_SUFFIXES))``."""
        values = self.physics.values()
        out: F64 = values[self.key_index]
        if self.mooney_offset:
            out[:, _MOONEY_COL] += self.mooney_offset
        return out

    def step(self, dt: float = SAMPLE_PERIOD_S) -> None:
        self.physics.step(dt)

    def write(self, name: str, value: float) -> None:
        """Write one set-point by full tag name (the simulator refuses values off limits)."""
        self.physics.write(self.layout.index(name), value)

    def apply(self, writes: Mapping[str, float]) -> None:
        for name, value in writes.items():
            self.write(name, value)

    def set_default(self, nests: npt.ArrayLike | None = None) -> None:
        """Put the default recipe on some (1-based) or all nests."""
        self.physics.set_setpoints(default_policy(self.physics.line_state()), nests)

    def set_recipe(self, heater: F64, pressure: F64, nests: npt.NDArray[np.int64]) -> None:
        """Heater and pressure set-points for the given 1-based nests (cure time unchanged)."""
        sp = self.physics.setpoints()
        h, p = sp.heater_c.copy(), sp.pressure_bar.copy()
        h[nests - 1] = heater
        p[nests - 1] = pressure
        self.physics.set_setpoints(Setpoints(h, p, sp.cure_s), nests)

    def tag_configs(self, suffixes: tuple[str, ...] = SETPOINT_SUFFIXES) -> dict[str, TagConfig]:
        """``TagConfig`` of the given writable tags of every nest, from the simulator's layout."""
        out: dict[str, TagConfig] = {}
        for station in self.stations:
            for suffix in suffixes:
                spec = self.layout.tag(f"{station}.{suffix}")
                assert spec.limits is not None
                out[spec.name] = TagConfig(
                    name=spec.name,
                    connection="sim",
                    unit=spec.unit,
                    resolution=spec.resolution,
                    writable=spec.writable,
                    limits=Limits(min=spec.limits[0], max=spec.limits[1]),
                    max_rate=spec.max_rate,
                    modbus=ModbusAddress(
                        unit=spec.modbus_unit,
                        address=spec.modbus_address,
                        type=spec.modbus_type,
                        scale=spec.scale,
                    ),
                )
        return out


class _Engine(Protocol):
    def step(self, values: npt.ArrayLike) -> Any: ...


@dataclass(slots=True)
class DriveLog:
    """What a closed-loop run produced (for tests, the benchmark and the docs' figures)."""

    steps: int = 0
    writes: list[tuple[float, str, float]] = field(default_factory=list)
    verdicts: list[Any] = field(default_factory=list)
    decisions: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def drive(
    engine: _Engine,
    line: SimLine,
    seconds: int,
    *,
    apply: bool = True,
    keep_events: bool = False,
    before_step: Callable[[int], None] | None = None,
) -> DriveLog:
    """Step ``line`` and ``engine`` together for ``seconds`` samples; apply guarded writes.

    Writes go through :meth:`SimLine.write` (the simulator's protocol-write path), which draws
    no random numbers, so a twin line with the same seed stays on the same random stream and
    gives the exact counterfactual of every tyre.
    """
    log = DriveLog()
    for k in range(seconds):
        if before_step is not None:
            before_step(k)
        line.step(SAMPLE_PERIOD_S)
        out = engine.step(line.sample())
        log.steps += 1
        log.verdicts.extend(out.verdicts)
        log.decisions.extend(out.decisions)
        if keep_events:
            log.events.extend(out.events)
        if apply:
            for name, value in out.writes.items():
                line.write(name, value)
                log.writes.append((line.now, name, value))
    return log


def tyres(line: SimLine) -> dict[tuple[int, int], float]:
    """Measured modulus of every finished tyre by ``(nest, cycle)``."""
    return {(c.nest, c.cycle): c.elasticity for c in line.physics.cycles}


class SimClock:
    """The line's simulated time as a :class:`~edgeos.clock.Clock` (fast-forwarded runs).

    Rate limits and timestamps must follow the process time the physics lives in, not the
    wall clock of the machine that fast-forwards it.
    """

    def __init__(self, line: SimLine, wall_offset: float = 1_700_000_000.0) -> None:
        self._line = line
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return self._line.now

    def time(self) -> float:
        return self._line.now + self._wall_offset

    async def sleep_until(self, deadline: float) -> None:
        raise RuntimeError("SimClock is stepped by the simulation; nothing sleeps on it")


class FleetRecorder:
    """Ships a line's key tags and a gateway engine's events through the receiver's ingest path.

    ``storage_url`` and ``registry_dir`` are a receiver's database and device registry (the
    device is registered when missing). Every ``batch_s`` samples become one batch, sealed with
    the wire format under the device's key, then opened (authenticated, decoded) by the
    receiver's :class:`~edgeos_cloud.receiver.ingest.BatchOpener` and stored in one transaction
    — what the receiver's writer thread does with a batch the broker delivered.
    """

    def __init__(
        self,
        storage_url: str,
        registry_dir: Any,
        device: str,
        stations: tuple[str, ...],
        *,
        batch_s: int = 10,
        resolution: float = 0.001,
        wall_offset: float = 1_700_000_000.0,
    ) -> None:
        from edgeos_cloud.receiver.ingest import BatchOpener
        from edgeos_cloud.receiver.registry import DeviceRegistry
        from edgeos_cloud.receiver.storage import open_storage
        from edgeos_protocol.batch import TagTable, ValueKind
        from edgeos_protocol.crypto import Epoch, Keyring

        registry = DeviceRegistry(registry_dir)
        record = registry.get(device) or registry.add(device)
        self.device = device
        self.epoch = Epoch.new(Keyring.of(record.current_key), device)
        self.opener = BatchOpener(registry)
        self.storage = open_storage(storage_url)
        names = [f"{s}.{k}" for s in stations for k in KEY_SUFFIXES]
        self.table = TagTable(
            np.arange(len(names)),
            names,
            [ValueKind.NUMBER] * len(names),
            [resolution] * len(names),
            [""] * len(names),
        )
        self.batch_s = batch_s
        self.wall_offset = wall_offset
        self._times: list[int] = []
        self._rows: list[F64] = []
        self._events: list[dict[str, Any]] = []
        #: Batches and samples stored so far.
        self.batches = 0
        self.samples = 0

    def add(self, now_s: float, values: F64, events: list[dict[str, Any]] | None = None) -> None:
        """One sample of ``(stations, KEY_SUFFIXES)`` values at line time ``now_s``."""
        self._times.append(round((now_s + self.wall_offset) * 1e6))
        self._rows.append(np.asarray(values, dtype=np.float64).reshape(-1))
        for ev in events or ():
            ts = float(ev.get("ts", 0.0))
            if ts < 1e9:  # events stamped on the monotonic (line) clock, or not at all
                ts = now_s + self.wall_offset
            self._events.append({**ev, "ts_us": round(ts * 1e6)})
        if len(self._times) >= self.batch_s:
            self.flush()

    def flush(self) -> None:
        from edgeos_protocol.batch import Batch, Group
        from edgeos_protocol.body import encode_body
        from edgeos_protocol.sealing import seal_batch

        if not self._times:
            return
        values = np.vstack(self._rows)
        group = Group(
            np.asarray(self._times, np.int64),
            np.arange(values.shape[1], dtype=np.int32),
            values,
            np.zeros(values.shape, np.uint8),
        )
        body = encode_body(Batch(self.table, [group], self._events, {"sim": True}))
        created = self._times[-1]
        _, sealed = seal_batch(self.epoch, body, created)
        batch = self.opener.open(sealed, created, self.device)
        self.storage.store([batch])
        self.batches += 1
        self.samples += batch.sample_count
        self._times, self._rows, self._events = [], [], []

    def close(self) -> None:
        self.flush()
        self.storage.close()


def record_run(
    line: SimLine,
    recorder: FleetRecorder,
    seconds: int,
    *,
    engine: _Engine | None = None,
    apply: bool = False,
) -> None:
    """Step ``line`` (and a gateway ``engine`` on it) for ``seconds``; ship every sample."""
    for _ in range(seconds):
        line.step(SAMPLE_PERIOD_S)
        values = line.sample()
        events: list[dict[str, Any]] = []
        if engine is not None:
            out = engine.step(values)
            events = list(out.events)
            if apply:
                line.apply(out.writes)
        recorder.add(line.now, values, events)


@dataclass(frozen=True, slots=True)
class DriftingRun:
    """What :func:`record_drifting_line` stored: the wall-clock µs of the rubber change and end."""

    device: str
    stations: tuple[str, ...]
    drift_us: int
    end_us: int


def record_drifting_line(
    storage_url: str,
    registry_dir: Any,
    device: str,
    models_dir: Any,
    *,
    nests: int = 20,
    before: int = 600,
    after: int = 2400,
    seed: int = 11,
    mooney_offset: float = 9.0,
    wall_offset: float = 1_700_000_000.0,
) -> DriftingRun:
    """A gateway's engine (the committed models) on a line that switches to a new rubber.

    ``before`` seconds on the old compound, then :meth:`SimLine.new_rubber` and ``after`` more,
    every sample and event shipped through the receiver's ingest path (:class:`FleetRecorder`).
    The guard is off (default recipe), so what changes is only what the models see.
    """
    from pathlib import Path

    from edgeos.config import GuardConfig
    from edgeos.inference.engine import InferenceEngine

    models = Path(models_dir)
    line = SimLine(nests, seed=seed)
    engine = InferenceEngine.from_manifests(
        [models / "anomaly.toml", models / "correction.toml", models / "quality.toml"],
        line.stations,
        line.tag_configs(),
        guard=GuardConfig(enabled=False),
        clock=SimClock(line, wall_offset),
    )
    recorder = FleetRecorder(
        storage_url, registry_dir, device, line.stations, wall_offset=wall_offset
    )
    try:
        record_run(line, recorder, before, engine=engine)
        drift_us = round((line.now + wall_offset) * 1e6)
        line.new_rubber(mooney_offset)
        record_run(line, recorder, after, engine=engine)
        end_us = round((line.now + wall_offset) * 1e6)
    finally:
        recorder.close()
    return DriftingRun(device, line.stations, drift_us, end_us)
