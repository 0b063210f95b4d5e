"""The gateway's name for :mod:`edgeos_protocol.features` (the feature code moved there).

The feature code is the model contract both products share: the gateway runs it on the twin's
samples, the cloud's trainer runs it on the receiver's stored samples. It lives in the protocol
package; this module keeps the old import path working for the runtime's callers.
"""

from __future__ import annotations

from edgeos_protocol.features import (
    ANOMALY_FEATURES,
    CORRECTION_FEATURES,
    CURE,
    FRESH_CYCLES,
    KEY_SUFFIXES,
    KNOWN_AFTER_CYCLES,
    LOAD,
    NEW_BATCH_BIT,
    QUALITY_FEATURES,
    SAMPLE_PERIOD_S,
    UNKNOWN_CYCLES_IN_BATCH,
    WINDOW,
    Observation,
    StationTracker,
    anomaly_rows,
    freshness,
)

__all__ = [
    "ANOMALY_FEATURES",
    "CORRECTION_FEATURES",
    "CURE",
    "FRESH_CYCLES",
    "KEY_SUFFIXES",
    "KNOWN_AFTER_CYCLES",
    "LOAD",
    "NEW_BATCH_BIT",
    "QUALITY_FEATURES",
    "SAMPLE_PERIOD_S",
    "UNKNOWN_CYCLES_IN_BATCH",
    "WINDOW",
    "Observation",
    "StationTracker",
    "anomaly_rows",
    "freshness",
]
