"""Host cost of calling a rewritten model: how the runner calls it (`attnopt/runner.py`,
`attnopt/unpadded.py`) against earlier ways, with the Hugging Face model on its own SDPA path
as the anchor.

An exported graph reads every parameter through its module path, one `nn.Module.__getattr__`
per step (about 1,300 calls per forward of a 12-layer BERT); the runner's view stores them as
plain attributes. The view runs an eager copy of the graph whose aten ops are called through
their Python bindings or C++ handles and whose canonical op skips the dispatcher when nothing
needs it (`runner.eager_graph`); a call whose attention_mask is all ones runs a copy without
the masks that all ones make redundant, and without the code that builds them
(`unpadded.py`).
Columns, alternated over `--rounds` rounds (median of the rounds' medians): HF sdpa; attnopt;
attnopt with every mask kept (`ATTNOPT_UNPADDED=0`, as before the unpadded copy); the view of
the rewritten graph itself (`view only`, as before the eager copy).

On CUDA: BERT-base (12 layers × 768, batch 8, bf16), unpadded and padded (every other row's
last quarter), and a 4-layer Llama (hidden 2048, batch 1, bf16, `use_cache=False`) at `--seq`
tokens, median CUDA-event latency of one forward (`bench_exact_cuda.median_ms`). On CPU: a
12-layer BERT of width 64 on 8 tokens, one thread, so that host time is all there is (minimum
over 5 runs of 200 forwards). Outputs are checked against the HF eager model first.

    PYTHONPATH=.:benchmarks python benchmarks/bench_graph_calls.py [--seq 1024 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnopt  # noqa: E402
from attnopt.region import Region  # noqa: E402
from attnopt.runner import fast_view  # noqa: E402
from bench_exact_cuda import (  # noqa: E402
    MaskBuilt, alternated, build, build_bert, median_ms,
)


class ViewOnly:
    """Rewritten graphs called through the view of their module tree, without the eager copy
    (and without the unpadded specialization, which runs eager copies)."""

    def __enter__(self):
        self.saved, views = Region.runner, {}
        Region.runner = lambda region, *call: views.get(id(region)) or views.setdefault(
            id(region), fast_view(region.rewritten))

    def __exit__(self, *exc):
        Region.runner = self.saved


@torch.no_grad()
def host_us(fn, runs: int = 5, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def row(name: str, eager, sdpa, kwargs: dict, output, rounds: int, median) -> None:
    optimized = attnopt.optimize(eager, "exact", example_kwargs=kwargs)
    with torch.no_grad():
        truth = output(eager(**kwargs)).float()
        errors = [(output(model(**kwargs)).float() - truth).abs().max().item()
                  for model in (optimized, sdpa)]
    nothing = contextlib.nullcontext
    times = alternated({"sdpa": (sdpa, nothing), "attnopt": (optimized, nothing),
                        "kept": (optimized, MaskBuilt), "view": (optimized, ViewOnly)},
                       lambda model: lambda: model(**kwargs), rounds, median)
    print(f"| {name} | {times['sdpa']:.2f} | {times['attnopt']:.2f} | {times['kept']:.2f} | "
          f"{times['view']:.2f} | {times['kept'] / times['attnopt']:.2f} | "
          f"{times['sdpa'] / times['attnopt']:.2f} | {errors[0]:.3f}, {errors[1]:.3f} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    unit = "ms" if device == "cuda" else "µs"
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}")
    print(f"| model | HF sdpa {unit} | attnopt {unit} | masks kept {unit} | view only {unit} "
          "| kept / attnopt | sdpa / attnopt | max abs err vs eager (attnopt, sdpa) |")
    print("|---|---|---|---|---|---|---|---|")
    if device == "cpu":
        torch.set_num_threads(1)
        ids = torch.randint(0, 30000, (1, 8))
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        row("BERT 12 × 64, 8 tokens", build_bert("eager", device, 64, width=64),
            build_bert("sdpa", device, 64, width=64), kwargs, lambda out: out.last_hidden_state,
            args.rounds, host_us)
        return
    for seq in args.seq:
        ids = torch.randint(0, 30000, (8, seq), device=device)
        padded = torch.ones_like(ids)
        padded[::2, -seq // 4:] = 0  # every other row's last quarter
        eager, sdpa = build_bert("eager", device, seq), build_bert("sdpa", device, seq)
        for label, mask in (("", torch.ones_like(ids)), (", padded", padded)):
            row(f"BERT-base B8, {seq}{label}", eager, sdpa,
                {"input_ids": ids, "attention_mask": mask}, lambda out: out.last_hidden_state,
                args.rounds, median_ms)
    eager, sdpa = build("eager", torch.bfloat16), build("sdpa", torch.bfloat16)
    for seq in args.seq:
        kwargs = {"input_ids": torch.randint(0, 32000, (1, seq), device=device),
                  "use_cache": False}
        row(f"Llama 4 layers B1, {seq}", eager, sdpa, kwargs, lambda out: out.logits,
            args.rounds, median_ms)


if __name__ == "__main__":
    main()
