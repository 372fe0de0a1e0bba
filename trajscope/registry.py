"""The metric registry: built-in metrics and plugins register the same way, and are checked then.

A metric is a :class:`MetricSpec`: a pure function plus declared metadata. Two kinds exist:

* ``"pair"``: ``fn(p: PairView) -> float | array`` of one pair's probe results (see
  :class:`trajscope.metrics.PairView`). With ``per_layer=True`` the same function is also applied
  to each parameter tensor's view and gives a ``<name>_by_layer`` variable with a ``layer`` dim.
* ``"series"``: ``fn(ds: xarray.Dataset) -> array over step`` computed from variables already in
  the Dataset (cumulative sums, running maxima), declaring them in ``requires``.

A pair metric that reads an optional probe result declares it in ``needs`` (only ``"sharpness"``
for now): it is computed only when the analysis runs that probe (``--sharpness``).

Built-ins live in :mod:`trajscope.metrics`. A third-party package adds metrics through the entry
point group ``trajscope.metrics``. An entry point may load to a ``MetricSpec``, a function
decorated with :func:`metric`/:func:`series`, a module (every decorated function in it), or an
iterable of those. A broken plugin produces a warning, never a crash. A plugin's metric that
breaks the contract is refused at registration, with a message naming the metric, its
distribution and the rule (see ``docs/adding-a-metric.md``).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

from trajscope.errors import MetricRegistrationError

__all__ = [
    "MetricSpec", "register", "metric", "series", "get_metrics", "refresh_plugins",
    "markdown_table", "holds", "ENTRY_POINT_GROUP", "KNOWN_NEEDS",
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
_PLUGINS_LOADED = False
_FROM_PLUGINS: set[str] = set()  # names registered while loading entry points


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
        raise MetricRegistrationError(f"{where}: pair metrics read the probe, not other metrics (requires must be empty)")
    if spec.name in _REGISTRY:
        other = _REGISTRY[spec.name].source
        raise MetricRegistrationError(f"{where}: name already registered by {other}")


def register(spec: MetricSpec) -> MetricSpec:
    """Check ``spec`` against the contract and add it to the registry."""
    _check(spec)
    _REGISTRY[spec.name] = spec
    if _loading:
        _FROM_PLUGINS.add(spec.name)
    return spec


_loading: list[str] = []  # distribution whose entry point is being loaded (innermost last)


@contextlib.contextmanager
def _loading_from(dist: str) -> Iterator[None]:
    _loading.append(dist)
    try:
        yield
    finally:
        _loading.pop()


def _source_of(fn: Callable[..., Any], source: str | None) -> str:
    """Who registers ``fn``: explicit, else the plugin distribution being loaded, else its package."""
    if source is not None:
        return source
    if _loading:
        return _loading[-1]
    return str(getattr(fn, "__module__", "") or "?").split(".")[0]


def metric(name: str, *, long_name: str, units: str, description: str, holds_if: str = "",
           dims: tuple[str, ...] = (), per_layer: bool = False, needs: tuple[str, ...] = (),
           source: str | None = None) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator registering a pair metric ``fn(p: PairView)``; returns ``fn`` unchanged (with the
    spec attached as ``fn.__trajscope_spec__``)."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        spec = MetricSpec(name, fn, "pair", long_name, units, description, holds_if, tuple(dims),
                          per_layer, (), _source_of(fn, source), needs=tuple(needs))
        register(spec)
        setattr(fn, SPEC_ATTR, spec)
        return fn

    return deco


def series(name: str, *, requires: tuple[str, ...], long_name: str, units: str, description: str,
           holds_if: str = "", source: str | None = None) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator registering a series metric ``fn(ds: xarray.Dataset) -> array over step``."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        spec = MetricSpec(name, fn, "series", long_name, units, description, holds_if, (), False,
                          tuple(requires), _source_of(fn, source))
        register(spec)
        setattr(fn, SPEC_ATTR, spec)
        return fn

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


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if getattr(ep, "dist", None) is not None else ep.value.split(":")[0]
        try:
            # The decorators of a module imported here register as this distribution.
            with _loading_from(dist):
                for spec in _specs_in(ep.load()):
                    # Already registered by the import just done (decorators): nothing to add.
                    # A module imported before (or by an earlier load) registers again here.
                    if _REGISTRY.get(spec.name) is not spec:
                        register(spec)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the tool
            warnings.warn(
                f"trajscope metric plugin {ep.name!r} ({ep.value}, from {dist}) failed to load: {exc}",
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
    """Forget loaded plugins so that the next :func:`get_metrics` reads entry points again.

    Metrics registered directly (a decorator run in a notebook or script) are kept.
    """
    global _PLUGINS_LOADED
    for name in _FROM_PLUGINS:
        _REGISTRY.pop(name, None)
    _FROM_PLUGINS.clear()
    _PLUGINS_LOADED = False


def holds(holds_if: str, values: Any) -> Any:
    """Elementwise: does each value satisfy ``holds_if`` (``"<= 0"``, ``"> 0"``, …)?

    Returns a boolean array, or None when ``holds_if`` is not a comparison (``""``, ``"bounded"``).
    NaN never satisfies a comparison.
    """
    import numpy as np

    m = re.match(r"^(<=|>=|==|<|>) ?(.+)$", holds_if)
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
