"""Quality codes of a sample: part of the wire format (one byte per sample), shared by both ends."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Quality"]


class Quality(IntEnum):
    """Quality of a tag value. Below ``BAD`` the value is usable."""

    GOOD = 0
    #: Restored from a snapshot; no fresh read yet.
    STALE = 1
    UNCERTAIN = 2
    BAD = 16
    #: The connection is down or the request timed out.
    BAD_COMM = 17
    #: The device answered with an exception (Modbus) or a bad status code (OPC UA).
    BAD_DEVICE = 18
    #: The bytes did not decode to the declared type (NaN, wrong length, bad UTF-8).
    BAD_DECODE = 19
    #: The address or node does not exist on the device.
    BAD_CONFIG = 20
    #: No value has been read yet.
    BAD_NO_VALUE = 21

    @property
    def usable(self) -> bool:
        return self < Quality.BAD
