"""What the storage writers share: the dtype maps over :data:`trajscope.runformat.DTYPES` and the
``O_DIRECT`` alignment.

Each format's writer is one module of this package; its reader is on the reading side
(:mod:`trajscope.store`). The one dtype table is :data:`trajscope.runformat.DTYPES` (torch dtype
name → safetensors code, element size, same-width integer view), re-exported here as
:data:`DTYPES`; the writers and the recorder's copy path derive their torch/numpy/HDF5 maps from it.
It is defined in :mod:`trajscope.runformat` because that module encodes safetensors headers with it
and is shared by the reader and the writer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trajscope import runformat as fmt
from trajscope.runformat import int_view

__all__ = ["DIRECT_IO_ALIGN", "DTYPES", "bits_dtype", "dtype_name"]

DTYPES = fmt.DTYPES

DIRECT_IO_ALIGN = 4096
"""O_DIRECT needs the buffer address, length and file offset aligned to the block size."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``: the dtype names of the manifest and the format."""
    return str(dtype).removeprefix("torch.")


def bits_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype that holds the bits of a tensor of dtype ``name``: its integer view if it
    has one, else its own numpy type."""
    return np.dtype(int_view(name) or name)
