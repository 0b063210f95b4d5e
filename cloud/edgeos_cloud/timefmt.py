"""Times on the cloud's command lines: ISO 8601 (UTC unless it says otherwise) or epoch seconds."""

from __future__ import annotations

import argparse
import datetime as dt

__all__ = ["optional_time", "parse_time"]


def parse_time(text: str) -> int:
    """``2024-05-01T12:00:00Z`` / ``2024-05-01`` / ``1714564800.5`` → µs since the epoch."""
    try:
        return round(float(text) * 1e6)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO 8601 nor epoch seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(when.timestamp() * 1e6)


def optional_time(text: str | None) -> int | None:
    """:func:`parse_time` for an optional ``--since``/``--until``."""
    return None if text is None else parse_time(text)
