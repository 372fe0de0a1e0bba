"""Storage backends: one module per snapshot format, each with its reader, writer and dtype map.

* :mod:`~trajscope.recorders.backends.base`: the :class:`Storage` interface (and
  :class:`FormatStorage`, a format's), the registry
  :data:`STORAGES` (format name → reader class) and the dtype helpers over
  :data:`trajscope.runformat.DTYPES`;
* :mod:`~trajscope.recorders.backends.safetensors`: ``steps/step_XXXXXXXX.safetensors``;
* :mod:`~trajscope.recorders.backends.hdf5`: ``trajectory.h5`` (h5py imported only when used).

Importing this package registers both formats.
"""

from __future__ import annotations

from trajscope.recorders.backends.base import STORAGES, Storage, read_raw
from trajscope.recorders.backends.hdf5 import HDF5Storage, HDF5Writer
from trajscope.recorders.backends.safetensors import SafetensorsStorage, SafetensorsWriter

__all__ = ["STORAGES", "HDF5Storage", "HDF5Writer", "SafetensorsStorage", "SafetensorsWriter", "Storage",
           "read_raw"]
