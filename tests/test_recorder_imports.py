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
