"""Storage writers: one module per snapshot format, each with its writer and dtype map.

* :mod:`~trajscope.recorders.backends.base`: the dtype helpers over
  :data:`trajscope.runformat.DTYPES` and the ``O_DIRECT`` alignment;
* :mod:`~trajscope.recorders.backends.safetensors`: ``steps/step_XXXXXXXX.safetensors``;
* :mod:`~trajscope.recorders.backends.hdf5`: ``trajectory.h5`` (h5py imported only when used).

The readers of both formats are on the reading side, :mod:`trajscope.store`.
"""

from __future__ import annotations

from trajscope.recorders.backends.hdf5 import HDF5Writer
from trajscope.recorders.backends.safetensors import SafetensorsWriter

__all__ = ["HDF5Writer", "SafetensorsWriter"]
