"""The write side of trajscope: a light recorder for any PyTorch training loop.

This package imports only torch, numpy and safetensors (never dask or xarray; h5py only when the
HDF5 format is chosen), so a training job does not pay for the analyzer. Framework adapters live in
submodules that are imported only when asked for: ``trajscope.recorders.lightning`` and
``trajscope.recorders.hf``. See ``docs/recording.md``.
"""

from trajscope.recorders.recorder import Recorder, RecorderStats, RecorderWarning
from trajscope.recorders.schedule import At, Every, Log

__all__ = ["Recorder", "RecorderStats", "RecorderWarning", "Every", "Log", "At"]
