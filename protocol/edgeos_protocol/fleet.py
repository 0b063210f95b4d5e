"""What a gateway tells the cloud about itself so the cloud can put it in a similarity group.

Two gateways are comparable — their models and recipes can compete and be swapped — when
they run the same kind of machines (equipment templates and the tag names inside them), the
same model tasks on the same input contracts, on the same hardware target. That is the
**fingerprint**. Both products compute it with the one pure function here,
:func:`fingerprint_of`: the gateway from its configuration and loaded manifests, the cloud
(tests, tools) from the same inputs, so the two can never disagree about what "the same" means.

The gateway sends it as an uplink event, the **fingerprint report** (a small versioned dict,
:func:`fingerprint_report`), in its first batch and whenever it changes; the receiver stores it
like every other event and the cloud's group directory reads it back
(:func:`parse_fingerprint_report`)::

    {"type": "fleet_fingerprint", "schema": 1, "ts": 1700000000.0,
     "templates": {"press": "<sha256 of the template's sorted tag names>"},
     "models": {"correction": "<contract sha256>", "quality": "…"},
     "hardware": "rpi4-aarch64", "key": "fp-<16 hex>",
     "versions": {"correction": "correction@1.0.0", "quality": "quality@1.1.0"}}

Instance counts do not enter the fingerprint: a 20-nest and an 80-nest line of the same press
are comparable. Model *versions* do not either (only their input contracts): versions are what
the group's gateways compete with. The report still carries the champion versions in force
(``versions``, informational, outside the key) because a gateway's engine loads its configured
models without an event; later changes arrive as ``model_loaded``/``model_promoted`` events.

The gateway also reports the configuration profile it runs (:data:`PROFILE_EVENT`,
``{"type": "profile_applied", "profile": "<name>@<version>"}``, next to its ``config_summary``
of :mod:`edgeos_protocol.profile`): the cloud's fleet evidence attributes each tyre to the model
versions *and* the profile in force when it was loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeos_protocol.errors import EdgeosError
from edgeos_protocol.manifest import Manifest

__all__ = [
    "FINGERPRINT_EVENT",
    "FINGERPRINT_SCHEMA",
    "PROFILE_EVENT",
    "Fingerprint",
    "FingerprintError",
    "contract_hash",
    "fingerprint_of",
    "fingerprint_report",
    "parse_fingerprint_report",
    "template_hash",
]

#: Event type of the fingerprint report.
FINGERPRINT_EVENT = "fleet_fingerprint"
#: Version of the report's schema; a reader refuses versions it does not know.
FINGERPRINT_SCHEMA = 1
#: Event type a gateway emits when a configuration profile is in force (``profile`` = key).
PROFILE_EVENT = "profile_applied"


class FingerprintError(EdgeosError):
    """A fingerprint report is malformed or of an unknown schema (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"fingerprint report rejected: {reason}")


def _sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def template_hash(tag_names: Iterable[str]) -> str:
    """sha256 of an equipment template's tag-name *set* (relative names; order and repeats
    do not matter)."""
    return _sha256(sorted(set(tag_names)))


def contract_hash(manifest: Manifest) -> str:
    """sha256 of what a gateway feeds a model and reads back: task, features, tags, window,
    output names, sample period. Weights, version and thresholds are not part of it."""
    return _sha256(
        {
            "task": manifest.task,
            "features": list(manifest.features),
            "tags": list(manifest.tags),
            "window": manifest.window,
            "outputs": [o.name for o in manifest.outputs],
            "sample_period_s": manifest.sample_period_s,
        }
    )


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What makes two gateways comparable (see the module docstring)."""

    #: Equipment template name → :func:`template_hash` of its tag names.
    templates: Mapping[str, str]
    #: Model task → :func:`contract_hash` of the manifest running it.
    models: Mapping[str, str]
    hardware: str

    @property
    def key(self) -> str:
        """``fp-<16 hex>``: the same for every gateway with the same fingerprint."""
        digest = _sha256(
            {
                "schema": FINGERPRINT_SCHEMA,
                "templates": dict(sorted(self.templates.items())),
                "models": dict(sorted(self.models.items())),
                "hardware": self.hardware,
            }
        )
        return f"fp-{digest[:16]}"

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.templates))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self.models))


def fingerprint_of(
    *,
    templates: Mapping[str, Iterable[str]],
    manifests: Iterable[Manifest] = (),
    hardware: str,
    contracts: Mapping[str, str] | None = None,
) -> Fingerprint:
    """The fingerprint of a gateway.

    ``templates`` maps each equipment template's name to its tag names (relative, as in the
    configuration's ``[templates.<name>]``); ``manifests`` are the models it runs (one per
    task; champion and challenger of a task share a contract — if they do not, the
    champion's must come first). ``contracts`` (task → contract hash) may be given instead
    of manifests, e.g. by the cloud from a registry. Pure: no I/O, no clock.
    """
    if not hardware:
        raise FingerprintError("hardware target is empty")
    models: dict[str, str] = dict(contracts or {})
    for m in manifests:
        models.setdefault(m.task, contract_hash(m))
    return Fingerprint(
        templates={name: template_hash(tags) for name, tags in sorted(templates.items())},
        models=dict(sorted(models.items())),
        hardware=hardware,
    )


def fingerprint_report(
    fingerprint: Fingerprint, *, ts: float, versions: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The uplink event carrying ``fingerprint`` (a plain, msgpack-able dict); ``versions``
    (task → ``name@version`` of the champion in force) rides along outside the key."""
    return {
        "type": FINGERPRINT_EVENT,
        "schema": FINGERPRINT_SCHEMA,
        "ts": ts,
        "templates": dict(fingerprint.templates),
        "models": dict(fingerprint.models),
        "hardware": fingerprint.hardware,
        "key": fingerprint.key,
        "versions": dict(versions or {}),
    }


def _str_map(report: Mapping[str, Any], field: str) -> dict[str, str]:
    raw = report.get(field)
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise FingerprintError(f"{field} must be a map of strings to strings")
    return dict(raw)


def parse_fingerprint_report(report: Mapping[str, Any]) -> Fingerprint:
    """The fingerprint in a stored report; raises :class:`FingerprintError`.

    The report's ``key`` (if present) must be the one its fields give: a report whose fields
    were altered (or computed by a different algorithm) is refused rather than grouped wrongly.
    """
    if report.get("type") != FINGERPRINT_EVENT:
        raise FingerprintError(f"type {report.get('type')!r} is not {FINGERPRINT_EVENT!r}")
    schema = report.get("schema")
    if schema != FINGERPRINT_SCHEMA:
        raise FingerprintError(f"schema {schema!r} is not {FINGERPRINT_SCHEMA} (upgrade the cloud)")
    hardware = report.get("hardware")
    if not isinstance(hardware, str) or not hardware:
        raise FingerprintError("hardware must be a non-empty string")
    fp = Fingerprint(
        templates=dict(sorted(_str_map(report, "templates").items())),
        models=dict(sorted(_str_map(report, "models").items())),
        hardware=hardware,
    )
    key = report.get("key")
    if key is not None and key != fp.key:
        raise FingerprintError(f"key {key!r} does not match its fields ({fp.key})")
    return fp
