"""Parameter spaces: what a bit-width slider offers, what a sweep enumerates, declared by each technique.

A front end (the Quantize panel, ``workbench sweep``) should not know that bitsandbytes calls 8 bits "int8" or
which group sizes a model takes. Each technique file declares its space next to its ``register(...)`` call::

    declare_space("rtn", bits=range(2, 9), group_sizes=(32, 64, 128, -1), symmetric=True, grid_sensitive=True)
    declare_space("bnb", formats={8: {"mode": "int8"}, 4: {"mode": "nf4"}})

and front ends ask :func:`parameter_space` for it, optionally for a loaded model::

    space = parameter_space("rtn", model)          # group sizes this model takes, a default off its grid
    space.config(bits=4, group_size=64, symmetric=True)
    space.sweep(bits=[8, 4])                       # the configs a sweep runs, every one validated first

Two things depend on the model. *Group sizes*: a group must divide the input width of every decoder linear
(and of fused MoE experts), the same rule the techniques' ``check`` applies; the demo model's 576- and
1536-wide layers take 32, 64, 96, 192 and per-channel, not 128. *The default point*: the demo model was
dequantized from Q4_1, so its weights sit exactly on a 4-bit group-32 asymmetric grid and RTN at that setting
is lossless by accident (:func:`workbench.quant_analysis.detect_grid`). When a grid is found, a
grid-sensitive space moves its default to a setting the grid does not favour and says why in ``reason``.

Field help comes from the config dataclass: ``dataclasses.field(metadata={"help": ...})`` where a field has
it, else the ``name: text`` lines of the config's docstring (the form every config here uses).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import ConfigError
from workbench.techniques.base import FieldInfo, _load_builtin, describe_fields, get_technique, make_config

# What a slider and a sweep offer when no model is loaded yet (per-channel is -1).
DEFAULT_GROUP_SIZES = (32, 64, 128, -1)
# Group sizes offered for a loaded model are whole multiples of this block: llama.cpp's quant blocks and the
# packed low-bit kernels work in blocks of 32 weights, so e.g. 16 or 48 would not export.
GROUP_BLOCK = 32
_DETECT = object()  # parameter_space(grid=...) default: run grid detection on the model


@dataclass(frozen=True)
class SpaceDeclaration:
    """What a technique file declares (see :func:`declare_space`); model-independent."""

    technique: str
    bits: tuple[int, ...]
    formats: Mapping[int, Mapping[str, Any]] | None
    group_sizes: tuple[int, ...]
    symmetric: bool
    grid_sensitive: bool


_SPACES: dict[str, SpaceDeclaration] = {}


def declare_space(
    technique: str,
    *,
    bits: Iterable[int] = (),
    formats: Mapping[int, Mapping[str, Any]] | None = None,
    group_sizes: Iterable[int] = (),
    symmetric: bool = False,
    grid_sensitive: bool = False,
) -> SpaceDeclaration:
    """Declare what a slider and a sweep may set for ``technique``.

    Args:
        bits: the bit widths of a technique whose config has a ``bits`` field (e.g. ``range(2, 9)``).
        formats: instead of ``bits``, for a technique whose width is a storage format: each width and the
            config fields that select it (``{8: {"mode": "int8"}, 4: {"mode": "nf4"}}``).
        group_sizes: the config's ``group_size`` choices before a model is known (-1 is per-channel); empty when
            the technique has no group-size setting a slider should offer.
        symmetric: the config has a ``symmetric`` switch to offer.
        grid_sensitive: quantizing onto a grid the weights already sit on would be lossless by accident, so the
            default point must avoid such a grid (round-to-nearest and the calibrated methods built on it).
    """
    if formats is not None:
        formats = {int(b): dict(fields) for b, fields in formats.items()}
        widths = tuple(sorted(formats))
    else:
        widths = tuple(sorted(int(b) for b in bits))
    if not widths:
        raise ValueError(f"declare_space({technique!r}): give bits=... or formats=...")
    decl = SpaceDeclaration(
        technique, widths, formats, tuple(group_sizes), bool(symmetric), bool(grid_sensitive)
    )
    _SPACES[technique] = decl
    return decl


def space_names() -> list[str]:
    """Techniques that declare a parameter space (the ones a bit-width slider or a sweep can drive)."""
    _load_builtin()  # importing the technique files fills the table
    return sorted(_SPACES)


def _declaration(name: str) -> SpaceDeclaration:
    """The declared space of ``name``; a technique that declares none but whose config has an integer ``bits``
    field gets bits 2 to 8 and nothing else (a new technique works with the slider before it declares more)."""
    tech = get_technique(name)  # an unknown name gets the technique table's message, with the known ones
    if name in _SPACES:
        return _SPACES[name]
    bits = {f.name: f for f in dataclasses.fields(tech.config_cls)}.get("bits")
    if bits is not None and isinstance(bits.default, int) and not isinstance(bits.default, bool):
        return SpaceDeclaration(name, tuple(range(2, 9)), None, (), False, False)
    raise ConfigError(
        f"{name}: declares no parameter space (no bit-width setting); use it from code with "
        f"make_config({name!r}, ...) or `workbench run --technique {name} --param NAME=VALUE`. "
        f"Techniques with one: {', '.join(sorted(_SPACES))}."
    )


# ---- field help ---------------------------------------------------------------------------------------------


# One implementation of a config's field help, in base.py (metadata first, then the docstring); kept under these
# names for the front ends that read them from here.
FieldHelp = FieldInfo
field_help = describe_fields


# ---- the space ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ParameterSpace:
    """The settings a front end offers for one technique (for one model, when ``model_widths`` is set).

    ``bits``: widths a slider offers, ascending. ``group_sizes``: the choices for ``group_size`` (-1 per-channel;
    empty when the technique has none to offer). ``symmetric``: ``(False, True)`` when there is a symmetry switch,
    else empty. ``default``: the point a panel starts at (``bits`` plus the axes it has). ``reason``: why the
    default differs from the config's own default ("" when it does not). ``labels``: a format name per width for
    format-based techniques (``{4: "nf4", 8: "int8"}``).
    """

    technique: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    symmetric: tuple[bool, ...]
    default: Mapping[str, Any]
    reason: str = ""
    labels: Mapping[int, str] = field(default_factory=dict)
    formats: Mapping[int, Mapping[str, Any]] | None = None
    model_widths: tuple[int, ...] = ()
    grid: Any = None  # the GridReport the default avoids, if any

    @property
    def help(self) -> dict[str, str]:
        """Help text per config field (see :func:`field_help`)."""
        return {f.name: f.help for f in field_help(self.technique)}

    def widths_text(self) -> str:
        """``4 (nf4), 8 (int8)`` or ``2, 3, 4, 5, 6, 7, 8``: the widths, as messages name them."""
        return ", ".join(f"{b} ({self.labels[b]})" if b in self.labels else str(b) for b in self.bits)

    def takes(self, bits: int) -> bool:
        return int(bits) in self.bits

    def label(self, bits: int) -> str:
        return f"{bits} ({self.labels[bits]})" if bits in self.labels else str(bits)

    def config(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool | None = None,
        **params: Any,
    ) -> Any:
        """The config of one point; an axis left as None takes the default point's value.

        ``params`` are further config fields passed through as they are (``double_quant=True`` for bnb). Bad
        values raise :class:`ConfigError` from the config itself, or, for a width a format-based technique does
        not have, one that lists the widths it takes.
        """
        values: dict[str, Any] = {}
        bits = int(self.default["bits"] if bits is None else bits)
        if self.formats is not None:
            if bits not in self.formats:
                raise ConfigError(
                    f"{self.technique} takes {self.widths_text()} bits, not {bits}; choose one of those."
                )
            fixed = self.formats[bits]
            clash = sorted(set(fixed) & set(params))
            if clash:
                raise ConfigError(
                    f"{self.technique}: the bit width sets {', '.join(clash)}; give the width or "
                    f"{', '.join(clash)}, not both."
                )
            values.update(fixed)
        else:
            values["bits"] = bits
        if self.group_sizes:
            values["group_size"] = int(self.default["group_size"] if group_size is None else group_size)
        elif group_size is not None:
            params["group_size"] = group_size  # not an axis here: the config decides whether it has the field
        if self.symmetric:
            values["symmetric"] = bool(self.default["symmetric"] if symmetric is None else symmetric)
        elif symmetric is not None:
            params["symmetric"] = symmetric
        return make_config(self.technique, **{**values, **params})

    def sweep(self, bits: Iterable[int] | None = None, **params: Any) -> list[Any]:
        """The configs a sweep runs: one per width (all widths, widest first, when ``bits`` is None), every one
        built before any is returned, so a bad width fails the whole sweep before any work."""
        widths = sorted(self.bits, reverse=True) if bits is None else [int(b) for b in bits]
        return [self.config(bits=b, **params) for b in widths]


def _model_widths(model: Any) -> tuple[int, ...]:
    """Input widths a group must divide: every decoder linear's, and every fused MoE expert tensor's (as
    ``check_group_size`` counts them)."""
    from workbench.techniques._quant import decoder_linears, fused_experts

    widths = {int(m.weight.shape[1]) for _, m in decoder_linears(model)}
    widths |= {int(p.shape[2]) for _, _, _, p in fused_experts(model)}
    return tuple(sorted(widths))


def group_sizes_for(widths: Iterable[int]) -> tuple[int, ...]:
    """Group sizes every width takes: multiples of 32 dividing every width (smaller divisors of at least 8 for
    models narrower than 32), then -1 (per-channel, always possible)."""
    widths = [int(w) for w in widths]
    if not widths:
        return (-1,)
    g = math.gcd(*widths)
    sizes = [d for d in range(GROUP_BLOCK, g + 1, GROUP_BLOCK) if g % d == 0]
    if not sizes:
        sizes = [d for d in range(8, g + 1) if g % d == 0]
    return (*sizes, -1)


def grid_favours(grid: Any, bits: int, group_size: int, symmetric: bool) -> bool:
    """True when quantizing at this point reproduces (or nearly) the grid the weights sit on.

    That is the grid's own group size, its width or a wider one whose levels contain its levels
    (``GridReport.finer_bits``: 4 → 8 for an asymmetric grid), and its form: an asymmetric grid is reproduced by
    asymmetric quantization only, a symmetric one by both forms.
    """
    if grid is None or group_size != grid.group_size:
        return False
    if bits != grid.bits and bits not in grid.finer_bits():
        return False
    return grid.form == "symmetric" or not symmetric


def _off_grid_default(
    point: dict[str, Any], space_groups: tuple[int, ...], has_symmetric: bool, grid: Any
) -> tuple[dict[str, Any], str]:
    """Move ``point`` off the grid: the next larger group size the model takes, else symmetric, else
    per-channel; with the sentence a panel shows."""
    larger = sorted(g for g in space_groups if g > grid.group_size)
    where = (
        f"this model's weights already sit on a {grid.bits}-bit grid (groups of {grid.group_size}, "
        f"{grid.style}), so {grid.form} group-{grid.group_size} quantization reproduces them and every method "
        "looks lossless there"
    )
    if larger:
        moved = {**point, "group_size": larger[0]}
        return moved, (
            f"Default group size {larger[0]}, not {point['group_size']}: {where}. Group "
            f"{grid.group_size} stays selectable."
        )
    if has_symmetric and grid.form == "asymmetric":
        moved = {**point, "symmetric": True}
        return moved, f"Default symmetric: {where}. Asymmetric stays selectable."
    if -1 in space_groups:
        moved = {**point, "group_size": -1}
        return moved, f"Default per-channel: {where}. Group {grid.group_size} stays selectable."
    return point, ""


def parameter_space(name: str, model: Any = None, *, grid: Any = _DETECT) -> ParameterSpace:
    """The parameter space of technique ``name``, for ``model`` when one is given.

    With a model, ``group_sizes`` are those that divide every decoder linear (see :func:`group_sizes_for`) and,
    for a grid-sensitive technique, the default avoids a grid the weights sit on. ``grid`` is that grid when
    the caller has already looked (a ``GridReport`` or None); by default the model is inspected (well under a
    second on the demo model; :class:`~workbench.workspace.Workspace` caches it per model).
    """
    decl = _declaration(name)
    cls = get_technique(name).config_cls
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    labels: dict[int, str] = {}
    if decl.formats is not None:
        for width, fields in decl.formats.items():
            labels[width] = ", ".join(str(v) for v in fields.values())
        own = [
            b for b, fields in decl.formats.items() if all(defaults.get(k) == v for k, v in fields.items())
        ]
        default_bits = own[0] if own else max(decl.bits)
    else:
        default_bits = int(defaults.get("bits", max(decl.bits)))
    point: dict[str, Any] = {"bits": default_bits}
    groups = decl.group_sizes
    widths: tuple[int, ...] = ()
    if model is not None and groups:
        widths = _model_widths(model)
        groups = group_sizes_for(widths)
    if groups:
        wanted = int(defaults.get("group_size", groups[0]) or groups[0])
        # A model that does not take the config's default group starts at the smallest group it takes.
        point["group_size"] = wanted if wanted in groups else groups[0]
    if decl.symmetric:
        point["symmetric"] = bool(defaults.get("symmetric", False))
    reason, report = "", None
    if model is not None and decl.grid_sensitive:
        if grid is _DETECT:
            from workbench.quant_analysis import detect_grid

            grid = detect_grid(model)
        report = grid
        if report is not None and grid_favours(
            report, point["bits"], point.get("group_size", -1), point.get("symmetric", False)
        ):
            point, reason = _off_grid_default(point, groups, decl.symmetric, report)
    return ParameterSpace(
        technique=name,
        bits=decl.bits,
        group_sizes=groups,
        symmetric=(False, True) if decl.symmetric else (),
        default=point,
        reason=reason,
        labels=labels,
        formats=decl.formats,
        model_widths=widths,
        grid=report,
    )


__all__ = [
    "DEFAULT_GROUP_SIZES",
    "FieldHelp",
    "ParameterSpace",
    "SpaceDeclaration",
    "declare_space",
    "field_help",
    "grid_favours",
    "group_sizes_for",
    "parameter_space",
    "space_names",
]
