"""`import trajscope.recorders` stays light: a training job must not pay for the analyzer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, sys, tempfile
    import numpy, safetensors.torch, torch
    top = lambda: {m.split(".")[0] for m in sys.modules}
    # the baseline includes a plain training step: torch imports more on the first step
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    base = top()
    import trajscope.recorders
    from trajscope.recorders import Recorder
    out = {"import": sorted(top() - base)}
    with tempfile.TemporaryDirectory() as d:
        with Recorder(d + "/st", model, opt) as rec:
            model(torch.ones(1, 2)).sum().backward()
            rec.batch(torch.ones(1, 2))
            opt.step()
        out["safetensors_run"] = sorted(top() - base)
        with Recorder(d + "/h5", model, opt, format="hdf5") as rec:
            pass
        out["hdf5_run"] = sorted(top() - base)
    print(json.dumps(out))
''')


def test_recorder_imports_nothing_beyond_torch_numpy_safetensors() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stdlib = set(sys.stdlib_module_names)
    assert [m for m in out["import"] if m not in stdlib] == ["trajscope"]
    assert [m for m in out["safetensors_run"] if m not in stdlib] == ["trajscope"]
    # h5py only when the HDF5 format is chosen
    assert [m for m in out["hdf5_run"] if m not in stdlib] == ["h5py", "trajscope"]


SEAM = textwrap.dedent('''
    import json, sys, tempfile
    import torch
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ours = lambda: sorted(m for m in sys.modules if m == "trajscope" or m.startswith("trajscope."))
    from trajscope.recorders import Recorder
    out = {"import": ours()}
    with tempfile.TemporaryDirectory() as d:
        for storage in ("safetensors", "hdf5"):
            with Recorder(f"{d}/{storage}", model, opt, format=storage) as rec:
                model(torch.ones(1, 2)).sum().backward()
                rec.batch(torch.ones(1, 2))
                opt.step()
        out["record"] = ours()
    print(json.dumps(out))
''')

READ = textwrap.dedent('''
    import json, sys
    import trajscope
    run = trajscope.open_run(sys.argv[1])
    run.snapshot(run.steps[0])
    print(json.dumps(sorted(m for m in sys.modules if m == "trajscope" or m.startswith("trajscope."))))
''')

# The recorder's modules may import only these of trajscope's (the shared, standard-library part).
RECORDER_MAY_IMPORT = {"trajscope", "trajscope._version", "trajscope.errors", "trajscope.runformat",
                       "trajscope.confine"}
# Each names a module that reads or analyzes: none of them belongs in a training process.
NOT_IN_A_TRAINING_PROCESS = ("trajscope.analysis", "trajscope.probe", "trajscope.metrics", "trajscope.report",
                             "trajscope.store", "trajscope.objective", "trajscope.tools")


def test_recording_loads_no_module_of_the_reading_side() -> None:
    """xarray's test_lazy_import names the submodules that must stay out, not top-level packages:
    a recorder that imported ``trajscope.store`` or ``trajscope.analysis.tasks`` would pass a
    top-level check (they are all ``trajscope``)."""
    proc = subprocess.run([sys.executable, "-c", SEAM], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase in ("import", "record"):
        loaded = out[phase]
        assert "trajscope.recorders.recorder" in loaded  # the check sees the recorder's own modules
        leaked = [m for m in loaded if m.startswith(NOT_IN_A_TRAINING_PROCESS)]
        assert not leaked, f"{phase}: {leaked}"
        assert {m for m in loaded if not m.startswith("trajscope.recorders")} <= RECORDER_MAY_IMPORT, loaded


def test_opening_a_run_loads_no_recorder_module(tmp_path) -> None:
    """Reading a run (``trajscope.open_run`` and a snapshot, in both storage formats) needs no
    writer: ``trajscope.store`` reads what the recorder writes through the format alone."""
    import torch

    from trajscope.recorders import Recorder

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for storage in ("safetensors", "hdf5"):
        run = tmp_path / storage
        with Recorder(run, model, opt, format=storage) as rec:
            model(torch.ones(1, 2)).sum().backward()
            rec.batch(torch.ones(1, 2))
            opt.step()
        proc = subprocess.run([sys.executable, "-c", READ, str(run)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "trajscope.store.run" in loaded and f"trajscope.store.{storage}" in loaded
        assert not [m for m in loaded if m.startswith("trajscope.recorders")], loaded
        assert not [m for m in loaded if m.startswith(("trajscope.analysis", "trajscope.probe"))], loaded


def test_worker_side_modules_do_not_import_the_dataset_libraries() -> None:
    """A pool process imports trajscope.analysis.driver to run pair tasks; xarray, pandas and netCDF4
    (~0.5 s of a worker's start-up) are for the driver's Dataset only."""
    script = ("import sys, trajscope.analysis.driver, trajscope.analysis.execution; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & "
              "{'xarray', 'pandas', 'netCDF4', 'matplotlib'}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_format_module_imports_neither_torch_nor_the_recorder() -> None:
    """trajscope.runformat holds the dtype table the storage backends share; it stays importable on
    its own (no torch, no trajscope.recorders, whose package imports trajscope.runformat)."""
    script = ("import sys, trajscope.runformat; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'trajscope')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    # trajscope._version reads the package metadata with the standard library only
    expected = ["trajscope", "trajscope._version", "trajscope.errors", "trajscope.runformat"]
    assert proc.stdout.strip() == str(expected), proc.stdout


def test_recorders_import_is_light() -> None:
    code = (
        "import sys, trajscope.recorders, trajscope\n"
        "trajscope.Recorder\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('dask', 'xarray', 'h5py', 'distributed', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
