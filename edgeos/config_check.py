"""The second pass of loading a configuration: cross-references between its sections.

The schema pass (pydantic) checked each table on its own. This pass checks what spans tables —
connections and scan groups named by tags, templates named by equipment, the driver of each
connection (options, endpoint, and that a tag's address key is the one its driver reads) — and
builds the runtime tags. It yields every problem, so a file with many mistakes reports all of
them at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

from edgeos.config_models import RECIPE_SUFFIXES, ConnectionConfig, InferenceConfig
from edgeos.config_tags import expand_equipment
from edgeos.driver import Driver, available_drivers, load_driver_class
from edgeos.errors import ConfigIssue
from edgeos.tags import Tag
from edgeos_protocol.validation import format_validation_error

if TYPE_CHECKING:
    from edgeos.config import Config

__all__ = ["build_tags", "check_recipe", "cross_check"]


def build_tags(config: Config) -> tuple[tuple[Tag, ...], list[ConfigIssue]]:
    """Explicit tags followed by every equipment instance's tags, in twin index order."""
    issues: list[ConfigIssue] = []
    expansion_issues = list(_check_equipment(config))
    if expansion_issues:
        return (), expansion_issues
    explicit = [t.runtime() for t in config.tags]
    stamped = expand_equipment(config.equipment, config.templates, issues)
    return tuple(explicit + stamped), issues


def cross_check(
    config: Config, *, check_drivers: bool
) -> tuple[tuple[Tag, ...], list[ConfigIssue]]:
    """Every cross-reference problem, and the runtime tags when there were none in them."""
    issues: list[ConfigIssue] = []
    conns: dict[str, ConnectionConfig] = {}
    for i, conn in enumerate(config.connections):
        if conn.name in conns:
            issues.append(
                ConfigIssue(f"connections[{i}].name", f"duplicate connection {conn.name!r}")
            )
        conns[conn.name] = conn
    groups = set()
    for i, group in enumerate(config.scan_groups):
        if group.name in groups:
            issues.append(
                ConfigIssue(f"scan_groups[{i}].name", f"duplicate scan group {group.name!r}")
            )
        groups.add(group.name)

    drivers = _connection_drivers(config, issues, check_drivers=check_drivers)

    # Equipment expansion errors first: they make the tag list unreliable.
    tags, expansion_issues = build_tags(config)
    issues.extend(expansion_issues)
    if expansion_issues:
        return (), issues

    seen: dict[str, str] = {}
    explicit = len(config.tags)
    for idx, tag in enumerate(tags):
        where = f"tags[{idx}]" if idx < explicit else f"equipment ({tag.name})"
        if tag.name in seen:
            issues.append(ConfigIssue(f"{where}.name", f"duplicate tag name {tag.name!r}"))
        seen[tag.name] = where
        tag_conn = conns.get(tag.connection)
        if tag_conn is None:
            known = ", ".join(sorted(conns)) or "none defined"
            issues.append(
                ConfigIssue(
                    f"{where}.connection",
                    f"unknown connection {tag.connection!r} (known: {known})",
                )
            )
        else:
            cls = drivers.get(tag_conn.name)
            if cls is not None and cls.address_key != tag.address_key:
                issues.append(
                    ConfigIssue(
                        f"{where}.{cls.address_key}",
                        f"connection {tag_conn.name!r} is {cls.title}; give a "
                        f"{cls.address_key!r} address (not {tag.address_key!r})",
                    )
                )
        if tag.scan_group not in groups:
            issues.append(
                ConfigIssue(
                    f"{where}.scan_group",
                    f"unknown scan group {tag.scan_group!r} (known: {', '.join(sorted(groups))})",
                )
            )

    issues.extend(check_recipe(config.inference, tags))
    names = [m.name for m in config.inference.models]
    for i, name in enumerate(names):
        if names.index(name) != i:
            issues.append(ConfigIssue(f"inference.models[{i}].name", f"duplicate model {name!r}"))
    if config.ota.enabled and not config.ota.repository_url:
        issues.append(
            ConfigIssue("ota.repository_url", "OTA is enabled but no repository_url is set")
        )
    return tags, issues


def check_recipe(inference: InferenceConfig, tags: Iterable[Tag]) -> list[ConfigIssue]:
    """The default recipe and the guard's soft limits name writable tags with hard limits and
    stay inside them (a set-point inside its soft limits too).

    The same rules as :func:`edgeos_protocol.profile.validate`, on the operator's own file.
    """
    by_name = {t.name: t for t in tags}
    issues: list[ConfigIssue] = []

    def hard(path: str, name: str) -> tuple[float, float] | None:
        tag = by_name.get(name)
        if tag is None or not tag.writable or tag.limits is None:
            issues.append(ConfigIssue(path, f"{name!r} is not a writable tag with hard limits"))
            return None
        return tag.limits.min, tag.limits.max

    soft = inference.guard.soft_limits
    for name, bounds in sorted(soft.items()):
        path = f"inference.guard.soft_limits.{name}"
        lim = hard(path, name)
        if lim is not None and (bounds.min < lim[0] or bounds.max > lim[1]):
            issues.append(
                ConfigIssue(
                    path,
                    f"[{bounds.min}, {bounds.max}] is not inside the hard limits "
                    f"[{lim[0]}, {lim[1]}]",
                )
            )
    for name, value in sorted(inference.setpoints.items()):
        path = f"inference.setpoints.{name}"
        lim = hard(path, name)
        if lim is None:
            continue
        if name.partition(".")[2] not in RECIPE_SUFFIXES:
            issues.append(
                ConfigIssue(path, f"not a recipe set-point ({', '.join(RECIPE_SUFFIXES)})")
            )
        elif not lim[0] <= value <= lim[1]:
            issues.append(ConfigIssue(path, f"{value} is outside the hard limits {list(lim)}"))
        elif name in soft and not soft[name].min <= value <= soft[name].max:
            s = soft[name]
            issues.append(
                ConfigIssue(path, f"{value} is outside the soft limits [{s.min}, {s.max}]")
            )
    return issues


def _connection_drivers(
    config: Config, issues: list[ConfigIssue], *, check_drivers: bool
) -> dict[str, type[Driver]]:
    """Connection name → driver class, for the connections whose driver loads.

    With ``check_drivers`` the driver also validates the connection's options and endpoint.
    """
    names = available_drivers()
    out: dict[str, type[Driver]] = {}
    for i, conn in enumerate(config.connections):
        if conn.driver not in names:
            if check_drivers:
                known = ", ".join(sorted(names)) or "none installed"
                issues.append(
                    ConfigIssue(
                        f"connections[{i}].driver",
                        f"unknown driver {conn.driver!r} (installed: {known})",
                    )
                )
            continue
        try:
            cls = load_driver_class(conn.driver)
        except Exception as exc:  # a broken plugin must not crash validation
            issues.append(
                ConfigIssue(
                    f"connections[{i}].driver",
                    f"driver {conn.driver!r} is installed but failed to load: {exc!r}",
                )
            )
            continue
        out[conn.name] = cls
        if not check_drivers:
            continue
        try:
            options = cls.options_model.model_validate(conn.options)
        except ValidationError as exc:
            issues.extend(format_validation_error(exc, prefix=f"connections[{i}].options"))
        else:
            if conn.scan_timeout_s < options.request_timeout_s:
                issues.append(
                    ConfigIssue(
                        f"connections[{i}].scan_timeout_s",
                        f"{conn.scan_timeout_s} s is shorter than one request may take "
                        f"(options.request_timeout_s = {options.request_timeout_s} s); a slow "
                        "answer would count as a lost connection",
                    )
                )
        problem = cls.check_endpoint(conn.endpoint)
        if problem:
            issues.append(ConfigIssue(f"connections[{i}].endpoint", problem))
    return out


def _check_equipment(config: Config) -> Iterable[ConfigIssue]:
    conns: Mapping[str, ConnectionConfig] = {c.name: c for c in config.connections}
    for i, eq in enumerate(config.equipment):
        if eq.template not in config.templates:
            known = ", ".join(sorted(config.templates)) or "none defined"
            yield ConfigIssue(
                f"equipment[{i}].template", f"unknown template {eq.template!r} (known: {known})"
            )
            continue
        bad_format = False
        for field in ("name", "connection", "unit"):
            fmt = getattr(eq, field)
            if fmt is None:
                continue
            try:
                fmt.format(n=eq.first)
            except (KeyError, ValueError, IndexError) as exc:
                bad_format = True
                yield ConfigIssue(
                    f"equipment[{i}].{field}",
                    f"bad format string {fmt!r}: {exc}; use {{n}} or {{n:02d}}",
                )
        if bad_format:
            continue
        if eq.unit is not None:
            try:
                units = [int(eq.unit.format(n=n)) for n in range(eq.first, eq.first + eq.count)]
            except (KeyError, ValueError, IndexError):
                yield ConfigIssue(f"equipment[{i}].unit", f"{eq.unit!r} must format to an integer")
                continue
            if any(not 0 <= u <= 255 for u in units):
                yield ConfigIssue(f"equipment[{i}].unit", "unit ids must be within 0..255")
        for n in (eq.first, eq.first + eq.count - 1):
            conn_name = eq.connection.format(n=n)
            if conn_name not in conns:
                yield ConfigIssue(
                    f"equipment[{i}].connection", f"instance {n}: unknown connection {conn_name!r}"
                )
                break
