"""The metric registry: built-in metrics and plugins register the same way, and are checked then.

A metric is a :class:`MetricSpec`: a pure function plus declared metadata. Two kinds exist:

* ``"pair"``: ``fn(p: PairView) -> float | array`` of one pair's probe results (see
  :class:`trajscope.metrics.PairView`). With ``per_layer=True`` the same function is also applied
  to each parameter tensor's view and gives a ``<name>_by_layer`` variable with a ``layer`` dim.
* ``"series"``: ``fn(ds: xarray.Dataset) -> array over step`` computed from pair variables
  already in the Dataset (cumulative sums, running maxima), declaring them in ``requires``.

Built-ins live in :mod:`trajscope.metrics`. A third-party package adds metrics through the entry
point group ``trajscope.metrics``; each entry point must load to a ``MetricSpec`` or an iterable of
them. A broken plugin produces a warning, never a crash (see ``docs/adding-a-metric.md``).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

from trajscope.errors import MetricRegistrationError

__all__ = ["MetricSpec", "register", "metric", "series", "get_metrics", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "trajscope.metrics"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_HOLDS_IF = re.compile(r"^(|bounded|(<|<=|>|>=|==) ?-?\d+(\.\d+)?(e-?\d+)?)$")
_KNOWN_DIMS = {"alpha"}


@dataclass(frozen=True)
class MetricSpec:
    """A metric: its pure function and the metadata every Dataset variable carries.

    Attributes:
        name: Dataset variable name (snake_case).
        fn: the function (see the module docstring for its argument).
        kind: ``"pair"`` or ``"series"``.
        long_name: short human label (plot axis).
        units: units of the value, in terms of ``loss`` and ``param`` (e.g. ``loss/param^2``).
        description: the exact formula.
        holds_if: what the theory needs, as ``"<= 0"``, ``"> 0"``, ``"< 1"``, ``"bounded"`` or
            ``""`` (no condition).
        dims: extra dims besides ``step`` (only ``("alpha",)`` for now).
        per_layer: also evaluate per parameter tensor (``<name>_by_layer``, dims step × layer).
        requires: for series metrics, the variables they read.
        source: the distribution that registered it (``trajscope`` for built-ins).
    """

    name: str
    fn: Callable[[Any], Any]
    kind: Literal["pair", "series"]
    long_name: str
    units: str
    description: str
    holds_if: str = ""
    dims: tuple[str, ...] = ()
    per_layer: bool = False
    requires: tuple[str, ...] = ()
    source: str = "trajscope"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def attrs(self) -> dict[str, str]:
        return {
            "long_name": self.long_name,
            "units": self.units,
            "description": self.description,
            "holds_if": self.holds_if,
            "metric_source": self.source,
        }


_REGISTRY: dict[str, MetricSpec] = {}
_PLUGINS_LOADED = False


def _check(spec: MetricSpec) -> None:
    where = f"metric {spec.name!r} (from {spec.source})"
    if not isinstance(spec.name, str) or not _NAME.match(spec.name):
        raise MetricRegistrationError(f"metric name {spec.name!r} (from {spec.source}): expected snake_case")
    if spec.kind not in ("pair", "series"):
        raise MetricRegistrationError(f"{where}: kind {spec.kind!r}, expected 'pair' or 'series'")
    if not callable(spec.fn):
        raise MetricRegistrationError(f"{where}: fn is not callable")
    params = [
        p for p in inspect.signature(spec.fn).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) != 1:
        arg = "p: PairView" if spec.kind == "pair" else "ds: xarray.Dataset"
        raise MetricRegistrationError(
            f"{where}: fn{inspect.signature(spec.fn)} must take exactly one argument ({arg})"
        )
    for attr in ("long_name", "units", "description"):
        if not isinstance(getattr(spec, attr), str) or not getattr(spec, attr):
            raise MetricRegistrationError(f"{where}: '{attr}' must be a non-empty string")
    if not isinstance(spec.holds_if, str) or not _HOLDS_IF.match(spec.holds_if):
        raise MetricRegistrationError(
            f"{where}: holds_if {spec.holds_if!r}; expected '', 'bounded' or a comparison like '<= 0'"
        )
    bad = set(spec.dims) - _KNOWN_DIMS
    if bad:
        raise MetricRegistrationError(f"{where}: unknown dims {sorted(bad)}; allowed {sorted(_KNOWN_DIMS)}")
    if spec.kind == "series" and (spec.dims or spec.per_layer):
        raise MetricRegistrationError(f"{where}: series metrics are over 'step' only")
    if spec.per_layer and spec.dims:
        raise MetricRegistrationError(f"{where}: per_layer metrics must be scalar per pair")
    if spec.name in _REGISTRY:
        other = _REGISTRY[spec.name].source
        raise MetricRegistrationError(f"{where}: name already registered by {other}")


def register(spec: MetricSpec) -> MetricSpec:
    """Check ``spec`` against the contract and add it to the registry."""
    _check(spec)
    _REGISTRY[spec.name] = spec
    return spec


def metric(name: str, *, long_name: str, units: str, description: str, holds_if: str = "",
           dims: tuple[str, ...] = (), per_layer: bool = False,
           source: str = "trajscope") -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator registering a pair metric ``fn(p: PairView)``; returns ``fn`` unchanged."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        register(MetricSpec(name, fn, "pair", long_name, units, description, holds_if, dims,
                            per_layer, (), source))
        return fn

    return deco


def series(name: str, *, requires: tuple[str, ...], long_name: str, units: str, description: str,
           holds_if: str = "", source: str = "trajscope") -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator registering a series metric ``fn(ds: xarray.Dataset) -> array over step``."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        register(MetricSpec(name, fn, "series", long_name, units, description, holds_if, (), False,
                            tuple(requires), source))
        return fn

    return deco


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            specs = [obj] if isinstance(obj, MetricSpec) else list(obj)
            for spec in specs:
                if not isinstance(spec, MetricSpec):
                    raise MetricRegistrationError(
                        f"entry point loaded {type(spec).__name__}, expected trajscope.MetricSpec"
                    )
                register(spec)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the tool
            warnings.warn(
                f"trajscope metric plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )


def get_metrics(names: Iterable[str] | None = None) -> dict[str, MetricSpec]:
    """Registered metrics (built-ins first, then plugins), optionally only ``names``."""
    import trajscope.metrics  # noqa: F401 - registers the built-ins

    _load_plugins()
    if names is None:
        return dict(_REGISTRY)
    out = {}
    for n in names:
        if n not in _REGISTRY:
            raise MetricRegistrationError(
                f"unknown metric {n!r}; known: {', '.join(sorted(_REGISTRY))}"
            )
        out[n] = _REGISTRY[n]
    return out


def refresh_plugins() -> None:
    """Forget loaded plugins so that the next :func:`get_metrics` reads entry points again."""
    global _PLUGINS_LOADED
    for name in [n for n, s in _REGISTRY.items() if s.source != "trajscope"]:
        del _REGISTRY[name]
    _PLUGINS_LOADED = False
