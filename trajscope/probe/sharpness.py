"""Sharpness: λ_max(∇²f(x; z)), the largest algebraic Hessian eigenvalue, by Hessian-vector products.

The method is Lanczos with full reorthogonalisation. It needs only products H·v; each one is a
double-backward through a graph built once. Lanczos finds the extreme eigenvalues of a symmetric
operator in far fewer products than power iteration. It also needs no shift to reach the largest
*algebraic* eigenvalue when the most negative one is larger in magnitude (power iteration would
converge to that one). The run stops when the Ritz residual ‖H·y − θ·y‖ = β_k·|s_k| of the top Ritz
pair is at most ``tol`` times the largest |Ritz value|. That residual bounds the eigenvalue error
(Bauer–Fike for symmetric matrices). When the Krylov space becomes invariant, the answer is exact.

Memory: the basis holds (iterations + 1) vectors of the parameters' size, in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

__all__ = ["EigResult", "lanczos_max_eig", "hessian_max_eig"]


@dataclass(frozen=True)
class EigResult:
    """The top Ritz value and how it was obtained.

    Attributes:
        value: the largest algebraic Ritz value (the λ_max estimate).
        iterations: operator products used (one Hessian-vector product each).
        converged: whether the residual test passed (or the Krylov space became invariant).
        residual: the final Ritz residual β_k·|s_k| (an upper bound on |value − λ|).
    """

    value: float
    iterations: int
    converged: bool
    residual: float


def lanczos_max_eig(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *,
                    max_iter: int = 100, tol: float = 1e-8, seed: int = 0,
                    device: str | torch.device = "cpu") -> EigResult:
    """Largest algebraic eigenvalue of the symmetric operator ``matvec`` on R^n.

    Args:
        matvec: v ↦ H·v for a float64 vector of shape (n,); may compute in a lower dtype.
        n: dimension.
        max_iter: at most this many products (and never more than n).
        tol: stop when the top Ritz residual ≤ tol · max |Ritz value|.
        seed: seed of the random start vector (a private generator: the global RNG is untouched,
            so analysing never shifts the dropout masks of later replays).
        device: where the basis lives.
    """
    if n < 1:
        raise ValueError(f"n={n}: expected a positive dimension")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter}: expected >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    q /= q.norm()
    k_max = min(max_iter, n)
    basis = torch.empty(k_max + 1, n, dtype=torch.float64, device=device)  # (k_max+1, n)
    basis[0] = q
    alphas: list[float] = []
    betas: list[float] = []
    theta, resid = float("nan"), float("inf")
    for k in range(1, k_max + 1):
        q = basis[k - 1]
        w = matvec(q).to(torch.float64).reshape(-1)  # (n,)
        a = float(w @ q)
        alphas.append(a)
        # Full reorthogonalisation, twice ("twice is enough", Parlett): the three-term recurrence
        # alone loses orthogonality as soon as a Ritz value converges and then returns ghost
        # copies of it; the basis is kept anyway, so orthogonalising costs little extra.
        prev = basis[:k]  # (k, n)
        for _ in range(2):
            w = w - prev.T @ (prev @ w)
        b = float(w.norm())
        off = np.array(betas)
        T = np.diag(alphas) + np.diag(off, 1) + np.diag(off, -1)
        evals, evecs = np.linalg.eigh(T)
        theta = float(evals[-1])
        resid = b * abs(float(evecs[-1, -1]))
        scale = float(np.max(np.abs(evals)))
        if resid <= tol * scale or b <= np.finfo(np.float64).tiny or k == n:
            # k == n: the basis spans R^n, T is similar to H and θ is exact up to rounding.
            return EigResult(theta, k, True, resid)
        betas.append(b)
        if k < k_max:
            basis[k] = w / b
    return EigResult(theta, k_max, False, resid)


def hessian_max_eig(f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                    x: Mapping[str, torch.Tensor], *, max_iter: int = 100, tol: float = 1e-8,
                    seed: int = 0) -> EigResult:
    """λ_max(∇²f(x)) for a scalar function of named tensors, by Lanczos on Hessian-vector products.

    One forward pass builds ∇f(x) with ``create_graph=True``; every product H·v is then the
    gradient of ⟨∇f(x), v⟩ through that same graph. Any randomness (dropout) and batch statistics
    are therefore those of that single forward pass, which the caller runs under the replayed RNG.
    """
    names = list(x)
    leaves = {n: x[n].detach().requires_grad_(True) for n in names}
    sizes = [leaves[n].numel() for n in names]
    dtype = leaves[names[0]].dtype
    device = leaves[names[0]].device
    with torch.enable_grad():
        loss = f(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    # A gradient that does not depend on the parameters (a linear layer into a linear loss) has a
    # zero Hessian block: it takes no part in the products.
    live = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(v.to(dtype), sizes)
        if not live:
            return torch.zeros_like(v)
        with torch.enable_grad():
            # (the sum of tensors is a tensor: `live` is not empty here)
            dot = cast(torch.Tensor, sum((g * pieces[i].view_as(g)).sum() for g, i in live))
            hv = torch.autograd.grad(dot, list(leaves.values()), retain_graph=True, allow_unused=True)
        return torch.cat([
            (h if h is not None else torch.zeros_like(leaves[n])).reshape(-1).to(torch.float64)
            for h, n in zip(hv, names)
        ])

    return lanczos_max_eig(hvp, sum(sizes), max_iter=max_iter, tol=tol, seed=seed, device=device)
