"""Sharpness λ_max(∇²f(x_t; z_t)) (trajscope.probe.sharpness): the Lanczos solver, then the probe against
dense Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import trajscope
from support.float64_reference import Reference
from support.problems import classification_data, classifier_run, make_mlp, make_mlp_dropout
from trajscope.probe.sharpness import hessian_max_eig, lanczos_max_eig


def sym(eigs: np.ndarray, seed: int = 0) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return torch.tensor(q @ np.diag(eigs) @ q.T)


def test_lanczos_finds_largest_algebraic_not_largest_magnitude() -> None:
    # The most negative eigenvalue dominates in magnitude: power iteration without a shift would
    # return −10; the largest algebraic eigenvalue is 0.7.
    eigs = np.concatenate([[-10.0, -6.0], np.linspace(-1, 0.5, 60), [0.7]])
    H = sym(eigs)
    res = lanczos_max_eig(lambda v: H @ v, len(eigs), tol=1e-10)
    assert res.converged
    assert res.value == pytest.approx(0.7, rel=1e-9)
    assert res.residual <= 1e-10 * 10


def test_lanczos_small_dimension_is_exact() -> None:
    H = sym(np.array([3.0, 1.0, -2.0]))
    res = lanczos_max_eig(lambda v: H @ v, 3)
    assert res.converged and res.iterations <= 3
    assert res.value == pytest.approx(3.0, rel=1e-12)


def test_lanczos_reports_non_convergence() -> None:
    H = sym(np.linspace(0, 1, 400) ** 3, seed=1)
    res = lanczos_max_eig(lambda v: H @ v, 400, max_iter=4, tol=1e-12)
    assert not res.converged and res.iterations == 4
    assert res.value <= 1.0 + 1e-12  # a Ritz value never exceeds λ_max
    assert res.residual > 1e-12


def test_lanczos_leaves_the_global_rng_alone() -> None:
    H = sym(np.arange(5.0))
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    lanczos_max_eig(lambda v: H @ v, 5, seed=123)
    assert torch.equal(torch.rand(3), want)


def test_hessian_max_eig_of_a_linear_model_is_zero() -> None:
    x = {"w": torch.randn(4, dtype=torch.float64)}
    res = hessian_max_eig(lambda p: (p["w"] * 3).sum(), x)
    assert res.converged and res.value == 0.0


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory):
    return classifier_run(tmp_path_factory.mktemp("sharp") / "run", steps=3, every=1, window=2)


def dense_hessian_top(run_dir, step: int) -> float:
    """λ_max of the dense Hessian by torch.autograd.functional.hessian (float64)."""
    run = trajscope.open_run(run_dir)
    snap = run.snapshot(step)
    model = make_mlp().model.double()
    names = run.trainable
    shapes = [tuple(snap.params[n].shape) for n in names]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = torch.cat([snap.params[n].double().reshape(-1) for n in names])
    x, y = snap.batch

    def loss(v: torch.Tensor) -> torch.Tensor:
        params = {n: p.view(s) for n, p, s in zip(names, torch.split(v, sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x.double(),)), y)

    H = torch.autograd.functional.hessian(loss, flat, vectorize=True)
    return float(torch.linalg.eigvalsh(H)[-1])


def test_sharpness_matches_dense_hessian_on_mlp(mlp_run) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, dtype="float64", points=3, sharpness=True,
                           metrics=["sharpness"], write=False, progress=False)
    assert set(ds.data_vars) >= {"sharpness", "sharpness_iterations", "sharpness_converged"}
    for t in ds.step.values:
        want = dense_hessian_top(mlp_run, int(t))
        got = float(ds.sharpness.sel(step=t))
        assert abs(got - want) <= 1e-4 * abs(want), (t, got, want)
    assert np.all(ds.sharpness_converged.values == 1)
    # float32 evaluation: the same eigenvalue to float32 accuracy
    ds32 = trajscope.analyze(mlp_run, make_mlp, points=3, metrics=["sharpness"], write=False,
                             progress=False)
    np.testing.assert_allclose(ds32.sharpness.values, ds.sharpness.values, rtol=1e-4)


def test_sharpness_with_dropout_uses_the_recorded_mask(tmp_path) -> None:
    run_dir = tmp_path / "drop"
    classifier_run(run_dir, make_mlp_dropout, steps=2, every=1, window=2)
    # device="cpu": the run was trained on the CPU, and a dropout mask can only be replayed by the
    # generator that drew it (the CUDA generator would draw a different one)
    ds = trajscope.analyze(run_dir, make_mlp_dropout, dtype="float64", points=3, device="cpu",
                           metrics=["sharpness"], write=False, progress=False)
    ref = Reference(run_dir, make_mlp_dropout)
    for t in ds.step.values:
        snap = ref.run.snapshot(int(t))
        want = ref.hessian_max_eig(ref.flat(snap.params), snap)
        assert float(ds.sharpness.sel(step=t)) == pytest.approx(want, rel=1e-6)


def test_classification_data_is_deterministic() -> None:
    # the dense-Hessian comparison relies on the recorded batch, not on regenerating it
    a, b = classification_data(), classification_data()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
