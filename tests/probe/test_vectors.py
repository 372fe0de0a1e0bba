"""The per-layer inner products of a pair (trajscope.probe.vectors.layer_terms), whole and in chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trajscope.metrics.pair import TERMS, VECTORS
from trajscope.probe import vectors


def _vectors(shapes: dict[str, tuple[int, ...]], absent: set[str]) -> dict[str, dict[str, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(0)
    return {k: {n: None if k in absent else torch.randn(s, generator=gen) for n, s in shapes.items()}
            for k in VECTORS}


def _reference(vec: dict[str, dict[str, torch.Tensor | None]], names: list[str]) -> dict[str, np.ndarray]:
    """Σ_i a_i·b_i over the whole parameter, in float64 with numpy."""
    out = {}
    for a, b in TERMS:
        vals = []
        for n in names:
            va, vb = vec[a][n], vec[b][n]
            vals.append(np.nan if va is None or vb is None else
                        float(np.dot(va.numpy().ravel().astype(np.float64), vb.numpy().ravel().astype(np.float64))))
        out[f"{a}.{b}"] = np.array(vals)
    return out


@pytest.mark.parametrize("chunk", [7, 64, 2**22])
def test_layer_terms_in_chunks_match_float64(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """A parameter larger than TERMS_CHUNK is summed chunk by chunk (the last chunk partial); the
    sums equal numpy's float64 dot products, and absent vectors give NaN."""
    monkeypatch.setattr(vectors, "TERMS_CHUNK", chunk)
    shapes = {"w": (10, 13), "b": (13,), "empty": (0,)}
    vec = _vectors(shapes, absent={"g_prev", "delta_prev", "x_dist"})
    names = list(shapes)
    got, want = vectors.layer_terms(vec, names), _reference(vec, names)
    assert set(got) == set(want) == {f"{a}.{b}" for a, b in TERMS}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-13, atol=1e-13, err_msg=k)
    assert np.isnan(got["g.g_prev"]).all() and np.isfinite(got["delta.delta"]).all()
    assert (got["delta.delta"][2], got["G0.G0"][2]) == (0.0, 0.0)  # an empty parameter sums to 0


def test_layer_terms_one_chunk_is_one_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter of at most TERMS_CHUNK elements is summed by one torch.dot (bit for bit)."""
    monkeypatch.setattr(vectors, "TERMS_CHUNK", 130)
    vec = _vectors({"w": (10, 13)}, absent=set())
    got = vectors.layer_terms(vec, ["w"])
    for a, b in TERMS:
        va, vb = vec[a]["w"], vec[b]["w"]
        assert va is not None and vb is not None
        assert got[f"{a}.{b}"][0] == float(torch.dot(va.reshape(-1).double(), vb.reshape(-1).double()))


@pytest.mark.parametrize("chunk", [7, 2**22])
def test_differences_formed_by_chunk_equal_whole_differences(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """A Difference (a − b formed a chunk at a time where it is summed, so that a pair never holds
    its difference vectors whole) gives the sums of the whole difference formed first, bit for bit."""
    monkeypatch.setattr(vectors, "TERMS_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (10, 13), "b": (13,)}
    a = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    b = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    whole = _vectors(shapes, absent=set())
    lazy: dict[str, dict[str, vectors.Vector | None]] = {k: dict(v) for k, v in whole.items()}
    for key in ("dG", "x_dist"):
        whole[key] = {n: a[n] - b[n] for n in shapes}
        lazy[key] = {n: vectors.Difference(a[n], b[n]) for n in shapes}
    got, want = vectors.layer_terms(lazy, list(shapes)), vectors.layer_terms(whole, list(shapes))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert np.isfinite(got["dG.dG"]).all() and (got["dG.dG"] > 0).all()
