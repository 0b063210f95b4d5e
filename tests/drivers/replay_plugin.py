"""A third-party driver written only against the public driver SDK: it replays a recording.

``test_third_party_driver.py`` copies this file into a temporary folder as the module
``edgeos_replay`` and registers ``ReplayDriver`` under the ``edgeos.drivers`` entry point
``replay`` with a ``*.dist-info`` folder — the way ``pip install edgeos-replay`` would. Nothing
in edgeos knows about it: it brings its own address key (``replay = { column = "…" }``), its
own address and options models and its own endpoint check.

The endpoint is ``file:///path/recording.jsonl``: one JSON object per line, column → value.
Every read of a scan group returns the next row; at the end it starts over (``loop``) or
holds the last row.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeos.driver import (
    DriverContext,
    DriverOptions,
    DriverStats,
    LossSignal,
    Quality,
    ReadResult,
    SubscriptionSink,
    TagBinding,
    Value,
)
from edgeos.errors import ConnectError, WriteRefused
from edgeos.tags import DataType, EquipmentInstance


class ReplayAddress(BaseModel):
    """``replay = { column = "speed", type = "float64" }``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    column: Annotated[str, Field(min_length=1)]
    type: Literal["float64", "int32", "bool"] = "float64"

    @property
    def data_type(self) -> DataType:
        return self.type

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def polled(self) -> bool:
        return True

    def runtime(self, instance: EquipmentInstance | None = None) -> ReplayAddress:
        if instance is None or "{" not in self.column:
            return self
        return self.model_copy(update={"column": self.column.format(equipment=instance.name)})


class ReplayOptions(DriverOptions):
    #: Start over at the end of the recording (else hold the last row).
    loop: bool = True


class ReplayDriver:
    title: ClassVar[str] = "file replay"
    options_model: ClassVar[type[ReplayOptions]] = ReplayOptions
    address_key: ClassVar[str] = "replay"
    address_model: ClassVar[type[ReplayAddress]] = ReplayAddress

    def __init__(self, context: DriverContext) -> None:
        self.stats = DriverStats()
        self.connection_lost = LossSignal()
        self._name = context.connection
        self._path = Path(urlsplit(context.endpoint).path)
        self._options = context.options_as(ReplayOptions)
        self._clock = context.clock
        self._groups: dict[str, list[tuple[int, str]]] = {}
        for binding in context.bindings:
            address = binding.tag.address
            if not isinstance(address, ReplayAddress):
                raise ValueError(f"tag {binding.tag.name!r} has no 'replay' address")
            self._groups.setdefault(binding.tag.scan_group, []).append(
                (binding.index, address.column)
            )
        self._rows: list[dict[str, float]] = []
        self._next: dict[str, int] = {}

    @staticmethod
    def check_endpoint(endpoint: str) -> str | None:
        parts = urlsplit(endpoint)
        if parts.scheme != "file" or not parts.path:
            return f"endpoint {endpoint!r} must be file:///path/recording.jsonl"
        return None

    async def connect(self) -> None:
        try:
            lines = self._path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConnectError(f"{self._name}: cannot open {self._path}: {exc.strerror}") from exc
        self._rows = [json.loads(line) for line in lines if line.strip()]
        if not self._rows:
            raise ConnectError(f"{self._name}: {self._path} holds no rows")
        self._next = {}
        self.connection_lost.clear()

    async def close(self) -> None:
        self._rows = []

    def set_subscription_sink(self, sink: SubscriptionSink | None) -> None:
        """A recording has no subscriptions."""

    async def read(self, scan_group: str) -> ReadResult:
        tags = self._groups.get(scan_group)
        if not tags:
            return ReadResult.empty()
        if not self._rows:
            raise ConnectError(f"{self._name}: not connected")
        position = self._next.get(scan_group, 0)
        row = self._rows[position]
        after = position + 1
        if after == len(self._rows):
            after = 0 if self._options.loop else position
        self._next[scan_group] = after
        self.stats.requests += 1
        self.stats.responses += 1
        values = np.array([float(row.get(column, math.nan)) for _, column in tags])
        missing = np.isnan(values)
        quality = np.where(missing, int(Quality.BAD_CONFIG), int(Quality.GOOD)).astype(np.uint8)
        result = ReadResult(
            np.array([index for index, _ in tags], dtype=np.int32),
            values,
            quality,
            np.full(len(tags), self._clock.time()),
        )
        if missing.any():
            result.bad_reasons = Counter({"no_such_column": int(missing.sum())})
        return result

    async def write(self, binding: TagBinding, value: Value) -> None:
        raise WriteRefused(binding.tag.name, "a recording is read-only")
