"""How a pair is probed: :class:`ProbeSettings`, decided once per analysis and handed to every pair.

The settings are part of the analysis' provenance (the Dataset's attrs) and, through
:meth:`ProbeSettings.to_json`, of the digest that tags persisted pairs: a pair persisted under other
settings is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from trajscope.errors import AnalysisError
from trajscope.metrics.pair import TERMS
from trajscope.probe.grid import alpha_grid

__all__ = ["DERIVATIVES", "ProbeSettings"]

DERIVATIVES = ("auto", "forward", "reverse")
"""The ``derivatives=`` choices of an analysis; a ProbeSettings holds the resolved one."""


@dataclass(frozen=True)
class ProbeSettings:
    """How a pair is probed. Part of the analysis' provenance (stored in the Dataset attrs)."""

    alphas: tuple[float, ...] = tuple(alpha_grid())
    device: str = "cpu"
    dtype: str = "float32"
    autocast: bool = True  # evaluate under the autocast each step's forward ran under (as trained)
    training_autocast: str = field(default="", compare=False)  # the run's autocast dtype ("bfloat16"); "": none
    compiled: bool = False  # gradient passes compiled, as a run trained compiled under autocast ran them
    chunk_size: int | None = None  # α points per vmap call; None: all at once
    batched: bool | None = True  # False: α points one by one; None: whichever is faster (trajscope.probe.line_plan)
    sharpness: bool = False  # λ_max(∇²f(x_t; z_t)) by Lanczos (one double-backward per iteration)
    sharpness_max_iter: int = 100  # Lanczos iterations (Hessian-vector products) at most
    sharpness_tol: float | None = None  # Ritz residual / max|Ritz value|; None: 1e-5 f32, 1e-8 f64
    reference_step: int | None = None  # x* of convexity_ratio_ref (the snapshot passed as ``ref``)
    derivatives: str = "forward"  # ℓ'(α) by "forward" (jvp, batched) or "reverse" (one backward per point)
    sdpa_math: bool = False  # hold scaled_dot_product_attention to its math kernel (forward mode needs it)
    derivatives_reason: str = field(default="", compare=False)  # why this path (Dataset attrs only)
    # Bytes one worker may add: with memory_strict (an explicit --max-memory) everything the analysis
    # adds to the worker, else the line evaluation's share; 0: half the available memory; None: no
    # budget (all points in one vmap call, halved on a CUDA out-of-memory). trajscope.probe.memory
    max_memory: int | None = field(default=None, compare=False)
    memory_strict: bool = field(default=False, compare=False)
    plan_id: str = field(default="", compare=False)  # the analysis: line plans are decided once per analysis

    def __post_init__(self) -> None:
        if self.derivatives not in ("forward", "reverse"):
            raise AnalysisError(f"derivatives={self.derivatives!r}: expected forward or reverse (resolved)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    @property
    def lanczos_tol(self) -> float:
        # A float32 Hessian-vector product carries ~1e-7 relative noise, so a float32 residual
        # cannot shrink much below 1e-6·‖H‖: a tighter default would never report convergence.
        if self.sharpness_tol is not None:
            return self.sharpness_tol
        return 1e-8 if self.dtype == "float64" else 1e-5

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alphas": list(self.alphas),
            "dtype": self.dtype,
            "batched": self.batched is not False,  # auto gives the same numbers: the same digest
            "chunk_size": self.chunk_size,
            "reference_step": self.reference_step,
            "sharpness": self.sharpness,
            # What a persisted pair holds: a pair saved before a term was added must not be
            # reused (the settings digest covers this JSON), or a metric would miss its term.
            "terms": hashlib.sha256(" ".join(f"{a}.{b}" for a, b in TERMS).encode()).hexdigest()[:12],
        }
        if self.sharpness:
            out["sharpness_max_iter"] = self.sharpness_max_iter
            out["sharpness_tol"] = self.lanczos_tol
        # Only a path other than plain forward mode is named: the digest of pairs persisted under
        # plain forward mode stays what it is, and a pair persisted under another path is not reused.
        if self.derivatives != "forward":
            out["derivatives"] = self.derivatives
        if self.sdpa_math:
            out["sdpa_math"] = True
        if not self.autocast:  # named only when off: pairs of runs without autocast keep their digest
            out["autocast"] = False
        if self.compiled:
            out["compiled"] = True
        return out

    @property
    def reduced_precision(self) -> bool:
        """Whether f is evaluated under training's autocast (its values carry that rounding)."""
        return self.autocast and bool(self.training_autocast)

    @property
    def precision_label(self) -> str:
        """The evaluation's precision in words (the Dataset's ``eval_precision``)."""
        if self.reduced_precision:
            compiled = ", gradient passes compiled as training was" if self.compiled else ""
            return f"as trained: {self.dtype} under {self.training_autocast} autocast{compiled}"
        if self.training_autocast:
            return f"{self.dtype} (training ran under {self.training_autocast} autocast)"
        return self.dtype

    @property
    def derivatives_label(self) -> str:
        """The resolved path in words: ``forward``, ``forward (sdpa math kernel)`` or ``reverse``."""
        return self.derivatives + (" (sdpa math kernel)" if self.sdpa_math else "")
