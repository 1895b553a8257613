"""2:4 semi-structured weights on CUDA: `to_sparse_semi_structured` vs the dense matmul.

Decides whether a 2:4 weight rewrite would make projections faster: for each (M, K, N) and
dtype, the same 2:4-pruned weight runs dense and semi-structured (cuSPARSELt, then CUTLASS
when forced); correctness against float64, then `triton.testing.do_bench` medians. Needs a
GPU with 2:4 support (compute capability 8.0+). Results in docs/BENCHMARKS.md.

Run: `PYTHONPATH=. python benchmarks/bench_semi_structured.py` (writes semi24.json to $OUT
or the current directory).
"""

import json
import os

import torch
import torch.nn.functional as F
import triton.testing as tt
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

print(torch.__version__, torch.cuda.get_device_name())


def prune24(w):
    """Keep the 2 largest of every 4 consecutive weights of a row."""
    g = w.reshape(w.shape[0], -1, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(w.shape)


rows = []
for force_cutlass in (False, True):
    SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
    for dtype in (torch.bfloat16, torch.float16):
        for M, K, N in ((4096, 1024, 1024), (4096, 1024, 3072), (16384, 2048, 2048),
                        (16384, 4096, 4096), (8192, 4096, 12288), (256, 4096, 4096)):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            w = prune24(torch.randn(N, K, device="cuda", dtype=dtype))
            b = torch.randn(N, device="cuda", dtype=dtype)
            try:
                ws = to_sparse_semi_structured(w)
                y = F.linear(x, ws, b)
                ref = F.linear(x.double(), w.double(), b.double())
                err = float((y.double() - ref).norm() / ref.norm())
                dense = tt.do_bench(lambda: F.linear(x, w, b))
                sparse = tt.do_bench(lambda: F.linear(x, ws, b))
                rows.append(dict(cutlass=force_cutlass, dtype=str(dtype), M=M, K=K, N=N,
                                 dense_ms=round(dense, 4), sparse_ms=round(sparse, 4),
                                 speedup=round(dense / sparse, 3), rel_err=err))
            except RuntimeError as error:  # e.g. CUTLASS refuses this compute capability
                rows.append(dict(cutlass=force_cutlass, dtype=str(dtype), M=M, K=K, N=N,
                                 error=str(error)[:200]))
            print(rows[-1])
with open(os.path.join(os.environ.get("OUT", "."), "semi24.json"), "w") as handle:
    json.dump(rows, handle, indent=1)
