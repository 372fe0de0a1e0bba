#!/usr/bin/env bash
# Wheels that the lent GPU machine (Python 3.12, no network) lacks for the analyzer, saved into
# .whl/ (ignored by git) so that a device run can carry them: `carry: [".whl"]`. The machine has
# torch, numpy, xarray, safetensors, h5py, click, tqdm, cloudpickle, toolz, pyyaml, fsspec,
# packaging, pytest; it lacks dask (and partd, locket) and h5netcdf.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  dask==2026.8.0 partd==1.4.2 locket==1.0.0 h5netcdf==1.8.2
ls .whl
