"""The metric registry: built-in metrics and plugins register the same way, and are checked then.

A metric is a :class:`MetricSpec`: a pure function plus declared metadata. Two kinds exist:

* ``"pair"``: ``fn(p: PairView) -> float | array`` of one pair's probe results (see
  :class:`trajscope.metrics.pair.PairView`). With ``per_layer=True`` the same function is also applied
  to each parameter tensor's :class:`~trajscope.metrics.pair.LayerView` (inner products only) and gives a
  ``<name>_by_layer`` variable with a ``layer`` dim.
* ``"series"``: ``fn(ds: xarray.Dataset) -> array over step`` computed from variables already in
  the Dataset (cumulative sums, running maxima), declaring them in ``requires``.

A pair metric that reads an optional probe result declares it in ``needs`` (only ``"sharpness"``
for now): it is computed only when the analysis runs that probe (``--sharpness``).

Where metrics come from, all through one loader (:func:`_register_from`): the built-in module
`trajscope.metrics.builtins` (:data:`BUILTIN_MODULES`, source ``trajscope``), then the entry point
group ``trajscope.metrics`` of third-party packages. An entry point may load to a ``MetricSpec``, a
function decorated with :func:`metric`/:func:`series`, a module (every decorated function in it),
or an iterable of those. The decorators only declare a spec there; the loader registers it. A
decorator run anywhere else (a notebook, a script) registers at once, and running it again in the
same module replaces the metric. A broken plugin produces a warning, never a crash. A metric that
breaks the contract is refused at registration, with a message naming the metric, its
distribution and the rule (see ``docs/adding-a-metric.md``); :func:`trajscope.testing.check_metric`
also runs it on a synthetic pair.

This module and :mod:`trajscope.metrics.builtins` import numpy only (no torch, no xarray).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

import numpy as np

from trajscope.errors import AnalysisError, MetricRegistrationError, TrajscopeWarning
from trajscope.metrics.pair import LayerView, PairStats, PairView, layer_views

__all__ = [
    "MetricSpec", "register", "check_spec", "metric", "series", "get_metrics", "refresh_plugins",
    "evaluate_pair", "markdown_table", "holds", "holds_bound", "ENTRY_POINT_GROUP", "KNOWN_NEEDS", "BUILTIN_MODULES",
]

ENTRY_POINT_GROUP = "trajscope.metrics"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_HOLDS_IF = re.compile(r"^(|bounded|(<|<=|>|>=|==) ?-?\d+(\.\d+)?(e-?\d+)?)$")
_KNOWN_DIMS = {"alpha"}
KNOWN_NEEDS: dict[str, str] = {
    "sharpness": "the Lanczos probe of λ_max(∇²f(x_t; z_t)) (analyze --sharpness)",
}
"""Optional probe results a pair metric may declare in ``needs``, and what provides each."""
SPEC_ATTR = "__trajscope_spec__"
"""Attribute the decorators set on the function, so a plugin module can be scanned for metrics."""


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
        needs: optional probe results the metric reads (keys of :data:`KNOWN_NEEDS`); it is
            computed only when the analysis provides them.
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
    needs: tuple[str, ...] = ()

    def attrs(self) -> dict[str, str]:
        return {
            "long_name": self.long_name,
            "units": self.units,
            "description": self.description,
            "holds_if": self.holds_if,
            "metric_source": self.source,
        }

    @property
    def dims_label(self) -> str:
        """``step[, alpha]`` plus ``(+layer)`` when a ``_by_layer`` variable is also produced."""
        return ",".join(("step",) + self.dims) + (" (+layer)" if self.per_layer else "")

    def __repr__(self) -> str:
        opt = f", needs={list(self.needs)}" if self.needs else ""
        holds = f", holds_if={self.holds_if!r}" if self.holds_if else ""
        return (f"MetricSpec({self.name!r}, {self.kind}, dims={self.dims_label!r}{holds}{opt}, "
                f"source={self.source!r}: {self.description})")


_REGISTRY: dict[str, MetricSpec] = {}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False
_FROM_PLUGINS: set[str] = set()  # names registered while loading entry points

BUILTIN_MODULES: tuple[str, ...] = ("trajscope.metrics.builtins",)
"""Modules of built-in metrics, loaded like a plugin module (source ``trajscope``) by :func:`get_metrics`."""


def check_spec(spec: MetricSpec) -> None:
    """Raise MetricRegistrationError unless ``spec`` keeps the metric contract (name, signature,
    attrs, ``holds_if``, dims, ``needs``/``requires``); the message names the metric and its source.

    Whether the name is free is checked by :func:`register`, not here.
    """
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
    _check_shape_and_inputs(spec, where)


def _check_shape_and_inputs(spec: MetricSpec, where: str) -> None:
    bad = set(spec.dims) - _KNOWN_DIMS
    if bad:
        raise MetricRegistrationError(f"{where}: unknown dims {sorted(bad)}; allowed {sorted(_KNOWN_DIMS)}")
    if spec.kind == "series" and (spec.dims or spec.per_layer):
        raise MetricRegistrationError(f"{where}: series metrics are over 'step' only")
    if spec.per_layer and spec.dims:
        raise MetricRegistrationError(f"{where}: per_layer metrics must be scalar per pair")
    unknown = [n for n in spec.needs if n not in KNOWN_NEEDS]
    if unknown:
        raise MetricRegistrationError(
            f"{where}: unknown needs {unknown}; known: {sorted(KNOWN_NEEDS)}"
        )
    if spec.kind == "series" and spec.needs:
        raise MetricRegistrationError(f"{where}: series metrics read the Dataset; declare requires, not needs")
    if spec.kind == "series" and (
        not spec.requires or not all(isinstance(r, str) and _NAME.match(r) for r in spec.requires)
    ):
        raise MetricRegistrationError(
            f"{where}: requires={spec.requires!r}; a series metric must name the variables it reads"
        )
    if spec.kind == "pair" and spec.requires:
        raise MetricRegistrationError(
            f"{where}: pair metrics read the probe, not other metrics (requires must be empty)"
        )


def _module_of(spec: MetricSpec) -> str | None:
    return getattr(spec.fn, "__module__", None)


def _add(spec: MetricSpec) -> None:
    """Check ``spec`` and put it in the registry. A name taken by a metric defined in the same
    module is replaced (a notebook cell run again); taken from elsewhere, it is refused."""
    check_spec(spec)
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec and (_module_of(spec) is None or _module_of(old) != _module_of(spec)):
        raise MetricRegistrationError(
            f"metric {spec.name!r} (from {spec.source}): name already registered by {old.source}"
        )
    _REGISTRY[spec.name] = spec


def register(spec: MetricSpec) -> MetricSpec:
    """Check ``spec`` against the contract and add it to the registry (after the built-ins).

    Registering a name again from the module that defined it replaces the metric; from another
    module it raises MetricRegistrationError.
    """
    _load_builtins()
    _add(spec)
    return spec


_loading: list[tuple[str, list[MetricSpec]]] = []  # (distribution, specs its decorators declared)


@contextlib.contextmanager
def _loading_from(dist: str) -> Iterator[list[MetricSpec]]:
    """While a metric module of ``dist`` is imported: its decorators declare specs here, and the
    loader registers them (see :func:`_register_from`)."""
    declared: list[MetricSpec] = []
    _loading.append((dist, declared))
    try:
        yield declared
    finally:
        _loading.pop()


def _source_of(fn: Callable[..., Any], source: str | None) -> str:
    """Who registers ``fn``: explicit, else the distribution being loaded, else its package."""
    if source is not None:
        return source
    if _loading:
        return _loading[-1][0]
    return str(getattr(fn, "__module__", "") or "?").split(".")[0]


def _declare(spec: MetricSpec, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """What both decorators do with the spec they built.

    In a module the loader imports (a plugin's, or a built-in module), the spec is checked and left
    for the loader to register. Anywhere else (a notebook, a script) it is registered at once.
    """
    if _loading:
        check_spec(spec)
        _loading[-1][1].append(spec)
    elif getattr(fn, "__module__", None) in BUILTIN_MODULES:
        check_spec(spec)  # imported directly: registered when get_metrics loads the module
    else:
        register(spec)
    setattr(fn, SPEC_ATTR, spec)
    return fn


def metric(name: str, *, long_name: str, units: str, description: str, holds_if: str = "",
           dims: tuple[str, ...] = (), per_layer: bool = False, needs: tuple[str, ...] = (),
           source: str | None = None) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator declaring a pair metric ``fn(p: PairView)`` (``fn(p: LayerView)`` per layer);
    returns ``fn`` unchanged, with the spec attached as ``fn.__trajscope_spec__``."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        spec = MetricSpec(name, fn, "pair", long_name, units, description, holds_if, tuple(dims),
                          per_layer, (), _source_of(fn, source), needs=tuple(needs))
        return _declare(spec, fn)

    return deco


def series(name: str, *, requires: tuple[str, ...], long_name: str, units: str, description: str,
           holds_if: str = "", source: str | None = None) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator declaring a series metric ``fn(ds: xarray.Dataset) -> array over step``."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        spec = MetricSpec(name, fn, "series", long_name, units, description, holds_if, (), False,
                          tuple(requires), _source_of(fn, source))
        return _declare(spec, fn)

    return deco


def _specs_in(obj: Any) -> list[MetricSpec]:
    """The specs an entry point's object stands for (see the module docstring)."""
    if isinstance(obj, MetricSpec):
        return [obj]
    if callable(obj) and isinstance(getattr(obj, SPEC_ATTR, None), MetricSpec):
        return [getattr(obj, SPEC_ATTR)]
    if isinstance(obj, types.ModuleType):
        found = [v for v in vars(obj).values() if isinstance(getattr(v, SPEC_ATTR, None), MetricSpec)]
        if not found:
            raise MetricRegistrationError(f"module {obj.__name__!r} defines no @metric/@series function")
        return [getattr(v, SPEC_ATTR) for v in found]
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [s for item in obj for s in _specs_in(item)]
    raise MetricRegistrationError(
        f"entry point loaded {type(obj).__name__}; expected a MetricSpec, a @metric/@series "
        "function, a module of them, or an iterable of those"
    )


def _register_from(dist: str, load: Callable[[], Any], *, plugin: bool) -> None:
    """Load one metric source (a built-in module or an entry point) and register what it holds.

    The specs are those its decorators declared while it was imported, then those
    :func:`_specs_in` finds in the loaded object (a module imported earlier declares nothing now).
    """
    with _loading_from(dist) as declared:
        obj = load()
    specs = list(declared)
    specs += [s for s in _specs_in(obj) if not any(s is d for d in declared)]
    for spec in specs:
        if _REGISTRY.get(spec.name) is not spec:
            _add(spec)
            if plugin:
                _FROM_PLUGINS.add(spec.name)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for name in BUILTIN_MODULES:
        # a broken built-in is a bug in trajscope: it raises, unlike a plugin
        _register_from("trajscope", functools.partial(importlib.import_module, name), plugin=False)


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found = getattr(ep, "dist", None)
        dist = found.name if found is not None else ep.value.split(":")[0]
        try:
            _register_from(dist, ep.load, plugin=True)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the tool
            warnings.warn(
                f"trajscope metric plugin {ep.name!r} ({ep.value}, from {dist}) failed to load: {exc}",
                TrajscopeWarning,
                stacklevel=2,
            )


def get_metrics(names: Iterable[str] | None = None) -> dict[str, MetricSpec]:
    """Registered metrics (built-ins first, then plugins), optionally only ``names``."""
    _load_builtins()
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
    """Forget loaded plugins so that the next :func:`get_metrics` reads entry points again.

    Built-ins and metrics registered directly (a decorator run in a notebook or script) are kept.
    """
    global _PLUGINS_LOADED
    for name in _FROM_PLUGINS:
        _REGISTRY.pop(name, None)
    _FROM_PLUGINS.clear()
    _PLUGINS_LOADED = False


def evaluate_pair(stats: PairStats, specs: Iterable[MetricSpec]) -> dict[str, np.ndarray]:
    """Every pair metric of ``specs`` on one pair: ``name`` → float64 value (an array over α for
    ``dims=("alpha",)``), plus ``<name>_by_layer`` (shape ``[n_layer]``) for ``per_layer`` ones,
    evaluated on each :class:`~trajscope.metrics.pair.LayerView`. Series metrics are skipped. Pure.

    Raises:
        AnalysisError: naming the metric, its source and the step, when a metric raises.
    """
    view = PairView(stats)
    per_layer: list[LayerView] | None = None
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.kind != "pair":
            continue
        try:
            out[spec.name] = np.asarray(spec.fn(view), dtype=np.float64)
            if spec.per_layer:
                if per_layer is None:
                    per_layer = layer_views(stats)
                out[f"{spec.name}_by_layer"] = np.array([spec.fn(v) for v in per_layer], dtype=np.float64)
        except Exception as exc:
            raise AnalysisError(
                f"metric {spec.name!r} ({spec.source}) failed at step {stats.step}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return out


_COMPARISON = re.compile(r"^(<=|>=|==|<|>) ?(.+)$")


def holds_bound(holds_if: str | None) -> float | None:
    """The number a comparison ``holds_if`` compares with (``"<= 1e-4"`` → 1e-4); None for ``""``,
    ``"bounded"`` or None."""
    m = _COMPARISON.match(holds_if or "")
    return float(m.group(2)) if m else None


def holds(holds_if: str, values: Any) -> Any:
    """Elementwise: does each value satisfy ``holds_if`` (``"<= 0"``, ``"> 0"``, …)?

    Returns a boolean array, or None when ``holds_if`` is not a comparison (``""``, ``"bounded"``).
    NaN never satisfies a comparison.
    """
    m = _COMPARISON.match(holds_if)
    if not m:
        return None
    op, bound = m.group(1), float(m.group(2))
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return {"<": v < bound, "<=": v <= bound, ">": v > bound, ">=": v >= bound,
                "==": v == bound}[op]


def markdown_table(specs: Iterable[MetricSpec]) -> str:
    """The registry as a Markdown table (name, kind, dims, units, holds if, definition).

    ``docs/metrics.md`` embeds this table for the built-ins; a test keeps the two identical.
    """
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| name | kind | dims | units | holds if | definition |",
            "| --- | --- | --- | --- | --- | --- |"]
    for spec in specs:
        kind = spec.kind + (f", needs {'+'.join(spec.needs)}" if spec.needs else "")
        rows.append(
            f"| `{spec.name}` | {kind} | {spec.dims_label} | {cell(spec.units)} | "
            f"{cell(spec.holds_if) or ''} | {cell(spec.description)} |"
        )
    return "\n".join(rows) + "\n"
