"""Tags, templates and equipment in the configuration file, and how they become runtime tags.

A tag table holds the settings every tag has (name, scan group, limits, …) plus exactly one
**address**, under the key its driver declares: ``modbus = {…}``, ``opcua = {…}``, or the key
of a third-party driver. The core does not know these keys: any key that is not a tag setting
is looked up among the installed drivers' ``address_key`` (:func:`edgeos.driver.address_models`)
and validated by that driver's ``address_model``, with errors under the key path
(``tags[3].modbus.address``). Whether the key matches the driver of the tag's connection is
checked with the cross-references (:mod:`edgeos.config_check`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Self, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails

from edgeos.config_models import Name
from edgeos.driver import address_models
from edgeos.errors import ConfigIssue
from edgeos.tags import (
    FLOAT_TYPES,
    DataType,
    DerivedAddress,
    EquipmentInstance,
    InstanceError,
    Limits,
    Tag,
    TagAddress,
    effective_resolution,
)

__all__ = [
    "EquipmentConfig",
    "TagConfig",
    "TagTemplate",
    "TemplateConfig",
    "derived_tag",
    "expand_equipment",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class _TagBase(_Model):
    unit: str = ""
    description: str = ""
    #: Smallest change that matters; values are quantized to it on the wire and in history.
    resolution: PositiveFloat | None = None
    #: Absolute change needed to count as a change (0 = every change).
    deadband: Annotated[float, Field(ge=0)] = 0.0
    scan_group: Name = "default"
    writable: bool = False
    limits: Limits | None = None
    #: Largest allowed change of a written value, in units per second.
    max_rate: PositiveFloat | None = None

    # Set by the validator below: the driver's validated address and the key it came under.
    _address: TagAddress = PrivateAttr(default_factory=DerivedAddress)
    _address_key: str = PrivateAttr(default="")

    @model_validator(mode="wrap")
    @classmethod
    def _split_address(cls, data: Any, handler: Callable[[Any], Self]) -> Self:
        if not isinstance(data, Mapping):
            return handler(data)
        settings = {k: v for k, v in data.items() if k in cls.model_fields}
        candidates = {k: v for k, v in data.items() if k not in cls.model_fields}
        errors: list[InitErrorDetails] = []
        model: Self | None = None
        try:
            model = handler(settings)
        except ValidationError as exc:
            errors.extend(_details(exc))
        found = _resolve_address(candidates, errors)
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        assert model is not None
        if found is None:
            keys = ", ".join(repr(k) for k in sorted(address_models())) or "none installed"
            raise ValueError(
                "a tag needs exactly one address, under the key of its connection's driver "
                f"({keys}), e.g. modbus = {{ address = 0 }}"
            )
        model._address_key, model._address = found
        model._check_tag()
        return model

    def _check_tag(self) -> None:
        dtype = self.data_type
        if self.writable and dtype not in ("bool", "string") and self.limits is None:
            raise ValueError("a writable numeric tag needs hard 'limits' = {min, max}")
        if self.resolution is None and dtype in FLOAT_TYPES and self.scale == 1.0:
            raise ValueError(
                "a float tag needs 'resolution' (smallest change that matters, "
                "used to quantize it on the wire), e.g. resolution = 0.01"
            )

    @property
    def address(self) -> TagAddress:
        """The driver's validated address model."""
        return self._address

    @property
    def address_key(self) -> str:
        return self._address_key

    @property
    def data_type(self) -> DataType:
        return self._address.data_type

    @property
    def scale(self) -> float:
        return self._address.scale

    @property
    def polled(self) -> bool:
        return self._address.polled

    @property
    def derived(self) -> DerivedAddress | None:
        return self._address if isinstance(self._address, DerivedAddress) else None

    @property
    def effective_resolution(self) -> float:
        """Resolution used for quantization when none is declared."""
        return effective_resolution(self.resolution, self._address)


def _details(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        detail: dict[str, Any] = {
            "type": err["type"],
            "loc": (*prefix, *err["loc"]),
            "input": err["input"],
        }
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        out.append(cast(InitErrorDetails, detail))
    return out


def _resolve_address(
    candidates: Mapping[str, Any], errors: list[InitErrorDetails]
) -> tuple[str, TagAddress] | None:
    """Validate the one address among the non-setting keys; report the rest as unknown."""
    models = address_models()
    keys = [k for k in candidates if k in models]
    for key in candidates:
        if key not in models:
            errors.append({"type": "extra_forbidden", "loc": (key,), "input": candidates[key]})
    if len(keys) > 1:
        found = ", ".join(repr(k) for k in keys)
        errors.append(
            {
                "type": "value_error",
                "loc": (),
                "input": dict(candidates),
                "ctx": {"error": f"a tag needs exactly one address, got {found}"},
            }
        )
        return None
    if not keys:
        return None
    key = keys[0]
    try:
        address = models[key].model_validate(candidates[key])
    except ValidationError as exc:
        errors.extend(_details(exc, (key,)))
        return None
    return key, cast(TagAddress, address)


class TagConfig(_TagBase):
    name: Name
    connection: Name

    def runtime(self) -> Tag:
        """The runtime record of this tag."""
        return Tag(
            self.name,
            self.connection,
            self._address.runtime(),
            self._address_key,
            self.unit,
            self.description,
            self.resolution,
            self.deadband,
            self.scan_group,
            self.writable,
            self.limits,
            self.max_rate,
        )


def derived_tag(name: str, *, resolution: float, unit: str = "", description: str = "") -> Tag:
    """A runtime-computed tag (connection ``@derived``): gate verdicts, model outputs."""
    return Tag(
        name,
        "@derived",
        DerivedAddress(),
        "derived",
        unit=unit,
        description=description,
        resolution=resolution,
    )


class TagTemplate(_TagBase):
    """A tag inside an equipment template; its name is relative to the equipment."""

    name: Name


class TemplateConfig(_Model):
    tags: Annotated[list[TagTemplate], Field(min_length=1)]


class EquipmentConfig(_Model):
    """Stamps a template out ``count`` times.

    ``name`` and ``connection`` are format strings over ``n`` (the instance number), e.g.
    ``name = "nest{n:02d}"``. Tag names become ``<name>.<template tag name>``. Each address
    is adapted per instance by its driver: Modbus unit ids follow ``unit`` (format string over
    ``n``) and addresses shift by ``address_stride * (n - first)``; OPC UA node ids may use
    ``{equipment}`` and ``{n}``.
    """

    name: Annotated[str, Field(min_length=1)]
    template: Name
    connection: Annotated[str, Field(min_length=1)]
    count: Annotated[int, Field(ge=1, le=10_000)] = 1
    first: Annotated[int, Field(ge=0)] = 1
    unit: str | None = None
    address_stride: Annotated[int, Field(ge=0)] = 0
    scan_group: Name | None = None


def expand_equipment(
    equipment: Iterable[EquipmentConfig],
    templates: Mapping[str, TemplateConfig],
    issues: list[ConfigIssue],
) -> list[Tag]:
    """Stamp templates out as runtime :class:`Tag` records; problems go to ``issues``.

    The template tags were validated as models and the equipment's format strings checked, so
    instances are plain records that share the template's unchanged parts (limits, strings,
    addresses the driver did not need to change). At 16,000 tags this takes the configuration
    from ~37 MB (one validated model per tag) to ~5 MB (measured with tracemalloc) — memory a
    gateway needs for history. An address that does not fit an instance (a shifted register
    past the end) is reported once per template tag, at its key path.
    """
    out: list[Tag] = []
    reported: set[tuple[str, int]] = set()
    for eq in equipment:
        template = templates[eq.template]
        for n in range(eq.first, eq.first + eq.count):
            prefix = eq.name.format(n=n)
            connection = eq.connection.format(n=n)
            instance = EquipmentInstance(
                prefix,
                n,
                n - eq.first,
                eq.address_stride,
                int(eq.unit.format(n=n)) if eq.unit is not None else None,
            )
            for j, tt in enumerate(template.tags):
                try:
                    address = tt.address.runtime(instance)
                except InstanceError as exc:
                    if (eq.template, j) not in reported:
                        reported.add((eq.template, j))
                        path = f"templates.{eq.template}.tags[{j}].{tt.address_key}"
                        if exc.field:
                            path += f".{exc.field}"
                        issues.append(
                            ConfigIssue(
                                path,
                                f"{exc} (equipment {eq.name!r}, instance {n}, "
                                f"address_stride {eq.address_stride}, count {eq.count})",
                            )
                        )
                    continue
                group = tt.scan_group
                if eq.scan_group is not None and "scan_group" not in tt.model_fields_set:
                    group = eq.scan_group
                out.append(
                    Tag(
                        f"{prefix}.{tt.name}",
                        connection,
                        address,
                        tt.address_key,
                        tt.unit,
                        tt.description,
                        tt.resolution,
                        tt.deadband,
                        group,
                        tt.writable,
                        tt.limits,
                        tt.max_rate,
                    )
                )
    return out
