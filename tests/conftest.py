import os
import sys

import torch
from hypothesis import settings

# Without a GPU the Triton kernels are tested under Triton's interpreter on CPU tensors; the
# variable must be set before triton is imported. The library itself never runs kernels on CPU
# tensors (the canonical op dispatches to them on CUDA only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# zoo.py and other test helpers import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite (and CI) draws the same hypothesis examples every run; set
# ATTNOPT_HYPOTHESIS_PROFILE=default to explore new ones.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile(os.environ.get("ATTNOPT_HYPOTHESIS_PROFILE", "deterministic"))
