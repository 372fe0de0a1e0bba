"""Property tests (hypothesis) for the run reader.

* Random truncation and byte corruption of step files, the manifest and ``scalars.jsonl`` give a
  :class:`TrajscopeError` or a correct result: never another exception type, never a hang.
* write → read round trips for arbitrary names (dotted identifiers, unicode included), dtypes
  (bf16, fp16, ints, bool, …) and shapes (0-size and 0-d included), through the format functions
  and through the Recorder itself.

Every target runs at least ``PROPERTY_EXAMPLES`` (default 500) cases, and each test asserts that
it did. Each case is cheap (tiny files, in-memory bytes, no model evaluation).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.rundirs import no_hang, quad_run, step_file
from trajscope import runformat as fmt
from trajscope.errors import TrajscopeError
from trajscope.recorders import Recorder
from trajscope.store import Run, Snapshot, open_run, read_snapshot
from trajscope.tools.validate import validate_run

PROPERTY_EXAMPLES = max(500, int(os.environ.get("TRAJSCOPE_PROPERTY_EXAMPLES", "500")))
PROPS = settings(max_examples=PROPERTY_EXAMPLES, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_target(test: Callable[..., None]) -> int:
    """Run a @given-wrapped ``test`` and return how many cases it ran to the end: a case that
    hypothesis rejects part-way (a failed ``assume`` or filtered draw) raises, and is not counted."""
    calls = 0
    inner = test.hypothesis.inner_test  # type: ignore[attr-defined]

    def counting(*a: Any, **k: Any) -> None:
        nonlocal calls
        with no_hang(10):
            inner(*a, **k)
        calls += 1

    test.hypothesis.inner_test = counting  # type: ignore[attr-defined]
    test()
    return calls


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small valid run, its files as bytes, and a scratch run directory to damage."""
    src = quad_run(tmp_path_factory.mktemp("props") / "run", steps=3)
    scratch = tmp_path_factory.mktemp("scratch") / "run"
    shutil.copytree(src, scratch)
    return {
        "step": step_file(src, 1).read_bytes(),
        "final": step_file(src, 3).read_bytes(),
        "manifest": (src / fmt.MANIFEST).read_bytes(),
        "scalars": (src / fmt.SCALARS).read_bytes(),
        "snap": read_snapshot(step_file(src, 1)),
        "final_snap": read_snapshot(step_file(src, 3)),
        "scratch": scratch,
    }


# --- damaged bytes ---------------------------------------------------------------------------------


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> tuple[bytes, list[int]]:
    """``data`` truncated, corrupted at a few positions, or both; plus the positions changed."""
    out = bytearray(data)
    changed: list[int] = []
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
            changed.append(i)
    if draw(st.booleans()) or not changed:
        cut = draw(st.integers(0, len(out)))
        del out[cut:]
        changed.append(cut)
    return bytes(out), changed


def bits(t: torch.Tensor) -> torch.Tensor:
    """A same-size integer view, so comparisons are bitwise (NaN payloads, -0.0 included)."""
    view = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}.get(t.dtype)
    return t.view(view) if view is not None else t


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def same_snapshot(a: Snapshot, b: Snapshot) -> bool:
    def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
        return x.keys() == y.keys() and all(same_tensor(x[k], y[k]) for k in x)

    return (a.step == b.step and a.kind == b.kind and same(a.params, b.params)
            and same(a.grads, b.grads) and same(a.buffers, b.buffers) and same(a.rng, b.rng)
            and a.lr == b.lr and a.training == b.training
            and (a.loss == b.loss or (a.loss != a.loss and b.loss != b.loss)))


def check_snapshot_bytes(path: Path, data: bytes, changed: list[int], original: bytes,
                         want: Snapshot) -> None:
    path.write_bytes(data)
    try:
        snap = read_snapshot(path)
    except TrajscopeError:
        return
    # a result must be a well-formed snapshot of the step its name says …
    assert isinstance(snap, Snapshot) and snap.step == want.step
    for group in (snap.params, snap.grads, snap.buffers, snap.rng):
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in group.items())
    # … and the right one wherever the damage could have been detected: unchanged bytes read back
    # exactly; damage confined to tensor data (no checksums in safetensors) keeps the structure
    if data == original:
        assert same_snapshot(snap, want)
    n = int.from_bytes(original[:8], "little")
    if len(data) == len(original) and min(changed) >= 8 + n:
        assert snap.params.keys() == want.params.keys()
        assert all(snap.params[k].shape == want.params[k].shape for k in want.params)
        assert snap.kind == want.kind and snap.lr == want.lr


def test_step_file_damage(base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = step_file(tmp_path_factory.mktemp("step"), 1)
    path.parent.mkdir(parents=True, exist_ok=True)

    @PROPS
    @given(damaged(base["step"]))
    def target(case: tuple[bytes, list[int]]) -> None:
        check_snapshot_bytes(path, case[0], case[1], base["step"], base["snap"])

    assert run_target(target) >= PROPERTY_EXAMPLES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=4) | st.sampled_from(["F64", "BOOL", "BF16", "U8", "F8_E4M3", "step", "final",
                                             "param/x", "batch/0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


def _json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _json_paths(v, prefix + (i,))
    return out


@st.composite
def header_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """Edit the header at the JSON level (the trajscope metadata string parsed too): replace,
    delete or add values anywhere, then re-serialise and fix the length prefix, so that damage
    gets past the JSON parser to every structure check behind it (and to safetensors')."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["trajscope"] = json.loads(header["__metadata__"]["trajscope"])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_json_paths(header)[1:]))
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            key = draw(st.text(max_size=6) | st.sampled_from(["__metadata__", "param/y", "step"]))
            parent[key] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and isinstance(meta.get("trajscope"), dict):
        meta["trajscope"] = json.dumps(meta["trajscope"])
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_step_header_edits(base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = step_file(tmp_path_factory.mktemp("hdr"), 1)
    path.parent.mkdir(parents=True, exist_ok=True)

    @PROPS
    @given(header_edits(base["step"]))
    def target(data: bytes) -> None:
        check_snapshot_bytes(path, data, [0], base["step"], base["snap"])

    assert run_target(target) >= PROPERTY_EXAMPLES


def test_final_file_truncation(base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = step_file(tmp_path_factory.mktemp("final"), 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = base["final"]

    @PROPS
    @given(st.integers(0, len(data)), st.binary(max_size=16))
    def target(cut: int, tail: bytes) -> None:
        # truncated, then possibly followed by garbage (a torn write into a reused file)
        check_snapshot_bytes(path, data[:cut] + tail, [cut], data, base["final_snap"])

    assert run_target(target) >= PROPERTY_EXAMPLES


def exercise_run(run: Run) -> None:
    """Touch everything a command does with an opened run (``info``, planning an analysis)."""
    repr(run)
    run.describe()
    run.trainable, run.num_params, run.final_step, run.objective, run.status
    for t in run.pairs:
        run.kind(t)
    try:
        run.scalars
    except TrajscopeError:
        pass


def test_manifest_damage(base: dict[str, Any]) -> None:
    run_dir: Path = base["scratch"]

    @PROPS
    @given(damaged(base["manifest"]))
    def target(case: tuple[bytes, list[int]]) -> None:
        data, _ = case
        (run_dir / fmt.MANIFEST).write_bytes(data)
        try:
            run = open_run(run_dir)
        except TrajscopeError:
            pass
        else:
            exercise_run(run)
            if data == base["manifest"]:
                assert run.pairs == [0, 1, 2] and run.status == "complete"
        report = validate_run(run_dir, quick=True)  # never raises
        assert report.ok or report.problems

    try:
        assert run_target(target) >= PROPERTY_EXAMPLES
    finally:
        (run_dir / fmt.MANIFEST).write_bytes(base["manifest"])


def test_scalars_damage(base: dict[str, Any]) -> None:
    run_dir: Path = base["scratch"]
    want = [json.loads(line) for line in base["scalars"].decode().splitlines()]

    @PROPS
    @given(damaged(base["scalars"]))
    def target(case: tuple[bytes, list[int]]) -> None:
        data, _ = case
        (run_dir / fmt.SCALARS).write_bytes(data)
        run = open_run(run_dir)
        try:
            lines = run.scalars
        except TrajscopeError:
            return
        assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in lines)
        if data == base["scalars"]:
            assert lines == want
        elif data == base["scalars"][: len(data)]:  # a pure truncation: a prefix of the lines
            assert lines == want[: len(lines)]

    try:
        assert run_target(target) >= PROPERTY_EXAMPLES
    finally:
        (run_dir / fmt.SCALARS).write_bytes(base["scalars"])


# --- round trips -----------------------------------------------------------------------------------

_MODULE_ATTRS = set(dir(nn.Module()))
_FIRST = "abcxyzABCXYZ_λéΩñ数"
_REST = _FIRST + "0123456789"
identifiers = (
    st.tuples(st.sampled_from(_FIRST), st.text(_REST, max_size=5)).map("".join)
    | st.sampled_from(["weight", "bias", "layers", "0a", "ff_1"]).filter(str.isidentifier)
).filter(lambda s: s not in _MODULE_ATTRS)


def _no_prefix_clash(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    kept: list[tuple[str, ...]] = []
    for p in paths:
        if all(p[: len(q)] != q and q[: len(p)] != p for q in kept):
            kept.append(p)
    return kept


names = st.lists(st.lists(identifiers, min_size=1, max_size=3).map(tuple), min_size=1, max_size=5,
                 unique=True).map(_no_prefix_clash)
shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OTHERS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, special: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
        if special and t.numel():
            flat = t.view(-1)
            for i, v in enumerate((float("nan"), float("inf"), -0.0, float("-inf"))[: flat.numel()]):
                flat[i] = v
        return t
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def test_format_round_trip(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = step_file(tmp_path_factory.mktemp("rt"), 5)
    path.parent.mkdir(parents=True, exist_ok=True)

    @PROPS
    @given(names, st.data())
    def target(paths: list[tuple[str, ...]], data: st.DataObject) -> None:
        tensors: dict[str, torch.Tensor] = {}
        params: dict[str, torch.Tensor] = {}
        for i, p in enumerate(paths):
            name = ".".join(p)
            dtype = data.draw(st.sampled_from(FLOATS + OTHERS))
            t = make_tensor(data.draw(shapes), dtype, i, data.draw(st.booleans()))
            params[name] = t
            tensors[fmt.PARAM + name] = t
            if dtype.is_floating_point:
                tensors[fmt.GRAD + name] = -t
            tensors[fmt.BUFFER + name] = t.clone()
        batch = {"by_name": {n: params[n] for n in list(params)[:2]}, "pair": (1, "a", None),
                 "list": [params[next(iter(params))], 2.5]}
        tree, leaves = fmt.flatten_batch(batch)
        for i, leaf in enumerate(leaves):
            tensors[f"{fmt.BATCH}{i}"] = leaf.clone()
        meta = {"step": 5, "kind": "step", "lr": [0.1, 1e-300], "batch_tree": tree, "loss": float("nan"),
                "training": True}
        # exactly the recorder's encoding (recorders/recorder.py::_write_snapshot)
        blob = safetensors.torch.save(tensors, metadata={"trajscope": json.dumps(meta, allow_nan=True)})
        fmt.atomic_write_bytes(path, blob)
        snap = read_snapshot(path)
        assert snap.step == 5 and snap.lr == [0.1, 1e-300] and snap.loss != snap.loss
        # A snapshot file holds no parameter order (safetensors loads its tensors in hash order;
        # the manifest holds named_parameters() order): check that exactly the names written come
        # back, each once, in every section.
        assert sorted(snap.params) == sorted(params)
        assert sorted(snap.buffers) == sorted(params)
        assert sorted(snap.grads) == sorted(n for n, t in params.items() if t.dtype.is_floating_point)
        for name, t in params.items():
            assert same_tensor(snap.params[name], t), name
            assert same_tensor(snap.buffers[name], t), name
            if t.dtype.is_floating_point:
                assert same_tensor(snap.grads[name], -t), name
        got = snap.batch
        assert set(got) == {"by_name", "pair", "list"} and got["pair"] == (1, "a", None)
        assert isinstance(got["list"], list) and got["list"][1] == 2.5
        assert all(same_tensor(got["by_name"][n], params[n]) for n in batch["by_name"])

    assert run_target(target) >= PROPERTY_EXAMPLES


class _Leaf(nn.Module):
    pass


def build_model(paths: list[tuple[str, ...]], specs: list[tuple[torch.dtype, tuple[int, ...], bool]]
                ) -> nn.Module:
    root = nn.Module()
    for p, (dtype, shape, trainable) in zip(paths, specs):
        mod = root
        for part in p[:-1]:
            if part not in mod._modules:
                mod.add_module(part, _Leaf())
            mod = mod._modules[part]
        t = make_tensor(shape, dtype, len(p), special=False)
        mod.register_parameter(p[-1], nn.Parameter(t, requires_grad=trainable))
    return root


def test_recorder_round_trip(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("rec")

    @PROPS
    @given(names, st.data())
    def target(paths: list[tuple[str, ...]], data: st.DataObject) -> None:
        specs = []
        for i in range(len(paths)):
            trainable = i == 0 or data.draw(st.booleans())
            dtype = data.draw(st.sampled_from(FLOATS if trainable else FLOATS + OTHERS))
            specs.append((dtype, data.draw(shapes), trainable))
        model = build_model(paths, specs)
        stat_dtype = data.draw(st.sampled_from(FLOATS + OTHERS))
        model.register_buffer("stat", make_tensor(data.draw(shapes), stat_dtype, 9, False))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        run_dir = root / uuid.uuid4().hex
        x0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {}
        with Recorder(run_dir, model, opt) as rec:
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad = make_tensor(tuple(p.shape), p.dtype, 3, special=False)
                    grads[n] = p.grad.clone()
            rec.batch({"x": torch.arange(3), "names": [".".join(p) for p in paths]}, loss=1.5)
            opt.step()
        x1 = {n: p.detach().clone() for n, p in model.named_parameters()}
        # the runs stay under pytest's tmp dir (deleting them costs more than writing them)
        run = open_run(run_dir)
        recorded = [(q["name"], tuple(q["shape"]), q["dtype"], q["trainable"])
                    for q in run.manifest["params"]]
        assert recorded == [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad)
                            for n, p in model.named_parameters()]
        assert run.steps == [0, 1] and run.pairs == [0]
        s0, s1 = run.snapshot(0), run.snapshot(1)
        for n in x0:
            assert same_tensor(s0.params[n], x0[n]), n
            assert same_tensor(s1.params[n], x1[n]), n
        assert grads.keys() == s0.grads.keys()
        assert all(same_tensor(s0.grads[n], g) for n, g in grads.items())
        assert same_tensor(s0.buffers["stat"], model.stat)
        assert s0.batch["names"] == [".".join(p) for p in paths] and s0.loss == 1.5
        assert torch.equal(s0.batch["x"], torch.arange(3))
        assert validate_run(run_dir).ok

    assert run_target(target) >= PROPERTY_EXAMPLES
