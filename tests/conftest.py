import os
import sys

import torch
from hypothesis import settings

# Without a GPU the Triton kernels are tested under Triton's interpreter on CPU tensors; the
# variable must be set before triton is imported. The library itself never runs kernels on CPU
# tensors (the canonical op dispatches to them on CUDA only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Parallel workers share the cores: each takes its share of threads. Oversubscribed OpenMP
# threads spin while they wait, which made a 20 s test take 180 s under `-n 2` on 2 cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

# zoo.py and other test helpers import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite (and CI) draws the same hypothesis examples every run; set
# ATTNOPT_HYPOTHESIS_PROFILE=default to explore new ones.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile(os.environ.get("ATTNOPT_HYPOTHESIS_PROFILE", "deterministic"))
