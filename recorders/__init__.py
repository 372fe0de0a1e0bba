"""The write side of trajscope: a light recorder for any PyTorch training loop.

This package imports only torch, numpy and safetensors (never dask or xarray), so a training job
does not pay for the analyzer. See ``docs/format.md`` for what it writes.
"""

from trajscope.recorders.recorder import Recorder
from trajscope.recorders.schedule import Every

__all__ = ["Recorder", "Every"]
