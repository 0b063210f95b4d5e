"""The OPC UA address of a tag (``opcua = {…}`` in the configuration).

The OPC UA driver declares ``address_key = "opcua"`` and :class:`OpcUaAddress` as its
``address_model``; the core validates every ``opcua`` table with it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from edgeos.tags import DataType, EquipmentInstance, InstanceError

__all__ = ["OpcUaAddress"]

_NODE_ID = re.compile(r"^(ns=\d+;)?[isgb]=.+$")


class OpcUaAddress(BaseModel):
    """A node to poll or subscribe to, and the type its value is delivered as."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    node_id: Annotated[str, Field(min_length=3)]
    mode: Literal["poll", "subscribe"] = "poll"
    #: Server-side sampling interval for subscriptions; ``None`` means the scan group's period.
    sampling_interval_ms: PositiveFloat | None = None
    queue_size: PositiveInt = 1
    type: DataType = "float64"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not _NODE_ID.match(self.node_id):
            raise ValueError(
                f"node_id {self.node_id!r} is not an OPC UA NodeId (e.g. 'ns=2;s=Line/Temp')"
            )
        return self

    # edgeos.tags.TagAddress ----------------------------------------------------------------

    @property
    def data_type(self) -> DataType:
        return self.type

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def polled(self) -> bool:
        return self.mode == "poll"

    def runtime(self, instance: EquipmentInstance | None = None) -> OpcUaAddress:
        """Itself, or for an equipment instance the node id with ``{equipment}``/``{n}`` filled.

        Instances share one object when the node id has no placeholder (memory at 16k tags).
        """
        if instance is None or "{" not in self.node_id:
            return self
        try:
            node_id = self.node_id.format(equipment=instance.name, n=instance.n)
        except (KeyError, ValueError, IndexError) as exc:
            raise InstanceError(
                "node_id", f"bad placeholder in {self.node_id!r}: {exc}; use {{equipment}} or {{n}}"
            ) from None
        return self.model_copy(update={"node_id": node_id})
