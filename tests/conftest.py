from __future__ import annotations

import os

# Tiny test models run fastest single-threaded (OpenMP spin-waits cost more than they save,
# badly so on a loaded 2-core CI machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
