"""Turn pydantic's validation errors into :class:`ConfigIssue` lines that name the key path.

Both ends validate their configuration files at the boundary the same way, so an operator sees
the same kind of message from ``edgeos check-config`` and from the cloud's commands.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from edgeos_protocol.errors import ConfigIssue

__all__ = ["format_loc", "format_validation_error"]


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        path = format_loc(err["loc"], prefix)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        if err["type"] == "literal_error" or err["type"].endswith("_type"):
            msg = f"{msg} (got {err.get('input')!r})"
        issues.append(ConfigIssue(path, msg))
    return issues


def format_loc(loc: Sequence[int | str], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after",) or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out
