"""Log a recurring problem at most once per key and minute (flash and log storage wear out)."""

from __future__ import annotations

__all__ = ["OncePerMinute"]


class OncePerMinute:
    """``should_log(key, now)`` is true the first time ``key`` is seen in a wall-clock minute."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._seen: dict[object, int] = {}
        self._max_keys = max_keys

    def should_log(self, key: object, now: float) -> bool:
        minute = int(now // 60)
        if self._seen.get(key) == minute:
            return False
        if len(self._seen) >= self._max_keys:
            # Forget keys of past minutes; a flood of distinct keys cannot grow memory.
            self._seen = {k: m for k, m in self._seen.items() if m == minute}
            if len(self._seen) >= self._max_keys:
                return False
        self._seen[key] = minute
        return True
