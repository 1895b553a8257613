"""Run the zoo through `attnopt.optimize` on another machine without pytest (e.g. a GPU box).

    PYTHONPATH=. python tests/device_check.py [cuda|cpu]

Prints one line per zoo case (sites rewritten, max abs error vs the original on fresh inputs)
and exits non-zero when any case fails. Used to check torch-version and CUDA compatibility.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import attnopt  # noqa: E402
from zoo import ZOO  # noqa: E402

MAX_ABS_ERR = 1e-5


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__} on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    failures = 0
    for name, case in sorted(ZOO.items()):
        torch.manual_seed(0)
        try:
            model = case.make().to(device)
            examples = tuple(t.to(device) for t in case.inputs())
            optimized = attnopt.optimize(model, example_inputs=examples)
            fresh = tuple(t.to(device) for t in case.inputs())
            with torch.no_grad():
                error = (optimized(*fresh) - model(*fresh)).abs().max().item()
            rewritten = len(optimized.report.rewritten)
            ok = rewritten == case.sites and error <= MAX_ABS_ERR
            print(f"{'ok  ' if ok else 'FAIL'} {name:<24} sites {rewritten}/{case.sites} "
                  f"max_abs_err {error:.2e}")
        except Exception as error:  # noqa: BLE001 - report every case, then fail
            ok = False
            print(f"FAIL {name:<24} {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        failures += not ok
    print(f"{len(ZOO) - failures}/{len(ZOO)} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
