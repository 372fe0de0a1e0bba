"""Hostile run directories: names that look like paths, symlinks and FIFOs planted in the run,
code placed next to the data, odd unicode, oversized and deeply nested files. trajscope must not
touch anything outside the run directory, never import or unpickle anything from it, never hang,
and fail with a TrajscopeError naming the culprit."""

from __future__ import annotations

import os
import pickle
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import trajscope
from support.problems import B_MEAN, DIM, make_quadratic, quad_loss
from support.recording import record
from support.rundirs import cli, copy_run, edit_manifest, fingerprint, no_hang, quad_run, rewrite_snapshot, step_file
from trajscope import runformat as fmt
from trajscope.errors import ObjectiveError, RunFormatError
from trajscope.objective import load_objective
from trajscope.store import open_run, read_snapshot
from trajscope.tools.validate import validate_run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("base") / "run", steps=3)


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A directory holding ``runs/run`` (a copy of the base run) and an ``outside/`` directory
    with a file that nothing may modify."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("precious")
    return tmp_path


@pytest.fixture
def run_dir(base_run: Path, area: Path) -> Path:
    (area / "runs").mkdir()
    return copy_run(base_run, area / "runs" / "run")


def rename_param(run_dir: Path, old: str, new: str) -> None:
    """Rename a parameter in the manifest and in every snapshot's tensor keys."""

    def manifest(m: dict) -> None:
        for q in m["params"]:
            if q["name"] == old:
                q["name"] = new
        for g in m["optimizer"]["param_groups"]:
            g["params"] = [new if n == old else n for n in g["params"]]

    edit_manifest(run_dir, manifest)

    def keys(t: dict, m: dict) -> None:
        for prefix in ("param/", "grad/"):
            if prefix + old in t:
                t[prefix + new] = t.pop(prefix + old)

    for f in sorted((run_dir / "steps").iterdir()):
        rewrite_snapshot(f, keys)


# --- names that look like paths --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "../../outside/victim.txt", "/tmp/trajscope-hostile/x",
                                  "a/../../../x", "..", "~/.bashrc", "C:\\x", "x/", "./x"])
def test_path_like_parameter_names_touch_nothing_outside(run_dir: Path, area: Path, name: str,
                                                         capsys) -> None:
    rename_param(run_dir, "x", name)
    before = fingerprint(area, exclude=run_dir / "analysis")

    run = open_run(run_dir)
    assert run.trainable == [name]
    assert run.snapshot(1).params[name].shape == (DIM,)
    run.describe()
    assert validate_run(run_dir).ok
    with pytest.raises(ObjectiveError, match=r"parameter .* is recorded but the objective's model"):
        trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)
    assert cli(["info", str(run_dir)], capsys)[0] == 0
    assert cli(["validate", str(run_dir)], capsys)[0] == 0
    code, _, err = cli(["analyze", str(run_dir), "-q", "--dtype", "float64"], capsys)
    assert code == 1 and "is recorded but the objective's model has no such parameter" in err

    assert fingerprint(area, exclude=run_dir / "analysis") == before
    assert not Path("/tmp/trajscope-hostile").exists()
    assert (area / "outside" / "victim.txt").read_text() == "precious"


class _PathNamed(nn.Module):
    """A model whose parameters have path-like names (PyTorch allows '/' but not '.')."""

    NAMES = ("/tmp/trajscope-hostile-abs/x", "up/down/x", "~")

    def __init__(self) -> None:
        super().__init__()
        for n in self.NAMES:
            self.register_parameter(n, nn.Parameter(torch.zeros(DIM, dtype=torch.float64)))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        ps = [getattr(self, n) for n in self.NAMES]
        return sum(quad_loss(_Wrap(p), b) for p in ps)


class _Wrap:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


def make_path_named() -> trajscope.Objective:
    return trajscope.Objective(model=_PathNamed(), loss=lambda m, b: m(b))


def test_full_analysis_with_path_like_names_writes_only_under_analysis(area: Path) -> None:
    run_dir = area / "runs" / "run"
    model = _PathNamed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    draws = (B_MEAN + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    record(run_dir, model, opt, lambda m, b: m(b), draws)
    before = fingerprint(area, exclude=run_dir / "analysis")
    ds = trajscope.analyze(run_dir, make_path_named, dtype="float64", progress=False)
    assert list(ds.layer.values) == list(_PathNamed.NAMES)
    assert np.isfinite(ds.inst_smoothness_by_layer).all()
    after = fingerprint(area, exclude=run_dir / "analysis")
    assert after == before
    written = fingerprint(run_dir / "analysis")
    assert "metrics.nc" in written and all(k in ("metrics.nc", ".lock") or k.startswith("pairs") for k in written)
    assert not Path("/tmp/trajscope-hostile-abs").exists()
    assert list(trajscope.open_metrics(run_dir).layer.values) == list(_PathNamed.NAMES)


# --- symlinks and special files planted in the run directory -------------------------------------


def test_symlinked_analysis_dir_is_refused(run_dir: Path, area: Path) -> None:
    (run_dir / "analysis").symlink_to(area / "outside", target_is_directory=True)
    before = fingerprint(area / "outside")
    with pytest.raises(RunFormatError, match=r"analysis: is a symlink; trajscope writes only inside"):
        trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)
    assert fingerprint(area / "outside") == before


def test_symlinked_pairs_dir_is_refused(run_dir: Path, area: Path) -> None:
    (run_dir / "analysis").mkdir()
    (run_dir / "analysis" / "pairs").symlink_to(area / "outside", target_is_directory=True)
    before = fingerprint(area / "outside")
    with pytest.raises(RunFormatError, match=r"pairs: is a symlink"):
        trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)
    assert fingerprint(area / "outside") == before


def test_planted_symlinks_at_output_names_are_replaced_not_followed(run_dir: Path, area: Path) -> None:
    victim = area / "outside" / "victim.txt"
    pairs = run_dir / "analysis" / "pairs"
    pairs.mkdir(parents=True)
    pid = os.getpid()
    (run_dir / "analysis" / f".metrics.nc.tmp-{pid}").symlink_to(victim)
    (pairs / f".pair_00000000.safetensors.tmp-{pid}").symlink_to(victim)
    (pairs / "pair_00000001.safetensors").symlink_to(victim)  # read (not a pair), then replaced
    (run_dir / "analysis" / "metrics.nc").symlink_to(victim)
    before = fingerprint(area / "outside")
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)
    assert list(ds.step.values) == [0, 1, 2]
    assert fingerprint(area / "outside") == before
    assert not (run_dir / "analysis" / "metrics.nc").is_symlink()
    assert not (pairs / "pair_00000001.safetensors").is_symlink()


def test_fifo_step_file_fails_fast(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    f.unlink()
    os.mkfifo(f)
    with no_hang(10):
        with pytest.raises(RunFormatError,
                           match=r"step_00000001.safetensors: expected a regular file .* found a FIFO"):
            read_snapshot(f)
        report = validate_run(run_dir)
        assert any("found a FIFO" in p for p in report.problems)
        with pytest.warns(trajscope.errors.DamagedRunWarning, match="skipped 2 of 3 pair"):
            ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    assert list(ds.step.values) == [2]


def test_fifo_manifest_and_scalars_fail_fast(run_dir: Path) -> None:
    scalars = run_dir / "scalars.jsonl"
    scalars.unlink()
    os.mkfifo(scalars)
    with no_hang(10):
        with pytest.raises(RunFormatError, match=r"scalars.jsonl: expected a regular file"):
            open_run(run_dir).scalars
    manifest = run_dir / "trajscope.json"
    manifest.unlink()
    os.mkfifo(manifest)
    with no_hang(10), pytest.raises(RunFormatError, match=r"trajscope.json: expected a regular file"):
        open_run(run_dir)


def test_directory_named_like_a_step_file(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    f.unlink()
    f.mkdir()
    with pytest.raises(RunFormatError, match=r"expected a regular file .* found a directory"):
        read_snapshot(f)


# --- nothing is unpickled; no code from the run directory runs ---------------------------------


def test_nothing_is_unpickled(run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    callers: list[str] = []

    def guard(original: object) -> object:
        def wrapper(*a: object, **k: object) -> object:
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            callers.append(caller)
            if caller != "dask.tokenize":  # dask round-trips its own graph objects to hash them
                raise AssertionError(f"{caller} unpickles")
            return original(*a, **k)  # type: ignore[operator]
        return wrapper

    for target, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load"), (np, "load")):
        monkeypatch.setattr(target, attr, guard(getattr(target, attr)))
    run = open_run(run_dir)
    run.describe()
    [run.snapshot(s) for s in run.steps]
    assert validate_run(run_dir).ok
    trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)
    trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)  # resume path
    trajscope.open_metrics(run_dir)
    assert cli(["info", str(run_dir)], capsys)[0] == 0
    assert set(callers) <= {"dask.tokenize"}


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")
def make():
    raise SystemExit("must never run")
"""


@pytest.fixture
def evil_run(run_dir: Path, area: Path, monkeypatch: pytest.MonkeyPatch):
    """The run names an objective module that sits inside the run directory."""
    name = f"evil_{uuid.uuid4().hex[:8]}"
    marker = area / "outside" / "IMPORTED"
    (run_dir / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    pkg = run_dir / f"{name}_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(EVIL.format(marker=str(marker)))
    (pkg / "sub.py").write_text(EVIL.format(marker=str(marker)))
    edit_manifest(run_dir, lambda m: m.update(objective=f"{name}:make"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name, marker
    for mod in (name, f"{name}_pkg", f"{name}_pkg.sub"):
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("cwd", ["run", "steps"])
def test_run_dir_is_never_put_on_sys_path(evil_run, run_dir: Path, cwd: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name, marker = evil_run
    monkeypatch.chdir(run_dir if cwd == "run" else run_dir / "steps")
    with pytest.raises(ObjectiveError, match=rf"cannot import module '{name}'.*inside the run directory"):
        trajscope.analyze(run_dir, dtype="float64", progress=False)
    assert not marker.exists()
    resolved = {str(Path(p).resolve()) for p in sys.path if p}
    assert str(run_dir.resolve()) not in resolved and str((run_dir / "steps").resolve()) not in resolved


@pytest.mark.parametrize("spec", ["{name}:make", "{name}_pkg:make", "{name}_pkg.sub:make"])
def test_module_inside_run_dir_is_refused_before_it_runs(evil_run, run_dir: Path, spec: str) -> None:
    name, marker = evil_run
    sys.path.insert(0, str(run_dir))  # as if python had been started there
    with pytest.raises(ObjectiveError, match=r"inside the run directory .*never runs code from a run"):
        load_objective(spec.format(name=name))
    assert not marker.exists()


def test_objective_from_manifest_cannot_be_a_path(run_dir: Path, area: Path) -> None:
    marker = area / "outside" / "IMPORTED"
    (area / "outside" / "evil.py").write_text(EVIL.format(marker=str(marker)))
    for spec in (f"{area / 'outside' / 'evil'}:make", "../../outside/evil:make", "..outside.evil:make"):
        edit_manifest(run_dir, lambda m: m.update(objective=spec))
        with pytest.raises(ObjectiveError, match="dotted Python identifiers"):
            trajscope.analyze(run_dir, dtype="float64", progress=False)
    assert not marker.exists()


# --- odd unicode, control characters --------------------------------------------------------------


@pytest.mark.parametrize("bad,cat", [("a\x00b", "Cc"), ("a\nb", "Cc"), ("ab\x1b[2J", "Cc"),
                                     ("a\u202eb", "Cf"), ("a\u200bb", "Cf"), ("\ud800", "Cs"),
                                     ("a\u2028b", "Zl"), ("", None), ("x" * 5000, None)])
def test_unprintable_names_are_refused(run_dir: Path, bad: str, cat: str | None) -> None:
    if cat == "Cs":  # safetensors cannot even write a lone surrogate: only the manifest has it
        edit_manifest(run_dir, lambda m: m["params"][0].update(name=bad))
    else:
        rename_param(run_dir, "x", bad)  # the snapshot keys too
    with pytest.raises(RunFormatError, match=r"trajscope.json: params\[0\].name: ") as e:
        open_run(run_dir)
    if cat:
        assert f"(category {cat})" in str(e.value)
    assert str(e.value).isprintable()
    if cat != "Cs":
        key = r"step_00000001.safetensors: tensor key (param|grad)/…"
        with pytest.raises(RunFormatError, match=key) as e:
            read_snapshot(step_file(run_dir, 1))
        assert str(e.value).isprintable()


@pytest.mark.parametrize("good", ["ä.λ.数", "a b", "layer-1", "..", "a/b", "Ω2"])
def test_printable_unicode_names_are_fine(run_dir: Path, good: str) -> None:
    rename_param(run_dir, "x", good)
    run = open_run(run_dir)
    assert list(run.snapshot(1).params) == [good]
    assert validate_run(run_dir).ok


def test_terminal_escapes_from_a_run_are_not_printed(run_dir: Path, capsys) -> None:
    edit_manifest(run_dir, lambda m: m.update(objective="x\x1b[2J\x1b]0;pwned\x07:y\nFAKE LINE"))
    code, out, err = cli(["info", str(run_dir)], capsys)
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\x1b[2J" in out
    assert not any(line.startswith("FAKE LINE") for line in out.splitlines())
    code, out, err = cli(["analyze", str(run_dir), "-q"], capsys)
    assert code == 1 and "\x1b" not in err and len(err.strip().splitlines()) == 1


# --- sizes and nesting are bounded before reading --------------------------------------------------


def test_oversized_manifest_is_refused_unread(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = run_dir / "trajscope.json"
    with open(manifest, "r+b") as fh:  # sparse: no real disk use
        fh.truncate(fmt.MAX_MANIFEST_BYTES + 1)
    expected = rf"manifest is {fmt.MAX_MANIFEST_BYTES + 1} bytes, larger than the limit"
    with no_hang(5), pytest.raises(RunFormatError, match=expected):
        open_run(run_dir)


def test_read_bounded_never_reads_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "big"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(RunFormatError, match="is 1000 bytes, larger than the limit 999"):
        fmt.read_bounded(f, 999, "manifest")
    assert fmt.read_bounded(f, 1000, "manifest") == b"x" * 1000


def test_giant_scalars_line_is_refused(run_dir: Path) -> None:
    path = run_dir / "scalars.jsonl"
    path.write_bytes(b'{"step": 0, "pad": "' + b"x" * (fmt.MAX_SCALARS_LINE_BYTES + 10) + b'"}\n')
    with pytest.raises(RunFormatError, match=r"scalars.jsonl:1: line longer than 1000000 bytes"):
        open_run(run_dir).scalars


@pytest.mark.parametrize("where", ["manifest", "header", "metadata", "scalars"])
def test_deeply_nested_json_is_an_error_not_a_crash(run_dir: Path, where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    if where == "manifest":
        (run_dir / "trajscope.json").write_text(deep)
        with pytest.raises(RunFormatError, match=r"trajscope.json: invalid JSON \(nested too deeply\)"):
            open_run(run_dir)
    elif where == "header":
        f = step_file(run_dir, 1)
        f.write_bytes(len(deep).to_bytes(8, "little") + deep.encode())
        with pytest.raises(RunFormatError, match=r"safetensors header is nested too deeply"):
            read_snapshot(f)
    elif where == "metadata":
        f = step_file(run_dir, 1)
        rewrite_snapshot(f, lambda t, m: None)
        import safetensors.torch

        f.write_bytes(safetensors.torch.save({"param/x": torch.zeros(1)}, metadata={"trajscope": deep}))
        with pytest.raises(RunFormatError, match=r"snapshot metadata is nested too deeply"):
            read_snapshot(f)
    else:
        path = run_dir / "scalars.jsonl"
        path.write_text(deep + "\n" + path.read_text())
        with pytest.raises(RunFormatError, match=r"scalars.jsonl:1: invalid JSON \(RecursionError\)"):
            open_run(run_dir).scalars
