"""Checkpoint conversion and benchmarking: a local model in, an optimized and checked file out
(`convert`), or the latency of the original against the optimized model (`bench`).

`convert(source, output, ...)` loads a Hugging Face model directory (`checkpoints.py`: weights
read with `weights_only=True`, never unpickled) or a `.pt2` ExportedProgram, synthesizes example
inputs from the config (or takes the program's own), optimizes it under the policy, and writes:

- `.onnx` — through `export_onnx` (onnx.checker, then onnxruntime against PyTorch on the
  examples and fresh draws);
- `.pt2` — the optimized graph re-exported and saved with `torch.export.save`; loading it back
  needs `import attnopt` first (the attnopt ops), and the loaded program is checked against the
  optimized model before the file is kept.

Outputs are written under a temporary name and renamed when complete; an existing output is
only replaced with `force=True`. The return value is the summary the CLI prints.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from attnopt.errors import VerificationError
from attnopt.timing import median_ms
from attnopt.verify import compare_outputs, format_table

OUTPUT_SUFFIXES = (".onnx", ".pt2")


def convert(source: str, output: str, *, policy: str = "exact",
            policy_file: Optional[str] = None, seq_len: int = 16, batch: int = 1,
            opset: Optional[int] = None, target: str = "onnx",
            report_path: Optional[str] = None, force: bool = False,
            progress: Callable[[str], None] = lambda step: None) -> str:
    from attnopt.api import optimize
    from attnopt.onnx_export import export_onnx
    from attnopt.policy import Policy

    output_path = Path(output)
    if output_path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {output!r} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if output_path.exists() and not force:
        raise ValueError(f"{output} exists; pass --force to overwrite it")
    if policy_file is not None:
        try:
            chosen = Policy.from_dict(json.loads(Path(policy_file).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read policy file {policy_file}: {error}") from None
    else:
        chosen = policy
    started = time.perf_counter()
    progress(f"loading {source}")
    model, args, kwargs = _load(source, seq_len, batch)
    progress("optimizing: capture, rewrite, verify")
    optimized = optimize(model, chosen, example_inputs=args or None, example_kwargs=kwargs,
                         capture="whole")
    report = optimized.report
    if report_path is not None:
        Path(report_path).write_text(report.to_json())
    lines = [str(report), ""]
    if output_path.suffix == ".onnx":
        result = export_onnx(optimized, output_path, example_inputs=args or None,
                             example_kwargs=kwargs, opset=opset, target=target,
                             progress=progress)
        worst = max(stats.max_abs_err for _, stats in result.errors)
        lines += [f"wrote {output} ({result.file_bytes / 1e6:.1f} MB, opset {result.opset}, "
                  f"dynamic batch/sequence)",
                  f"onnxruntime vs PyTorch: passed on {len(result.errors)} input set(s), "
                  f"max abs error {worst:.2e}; latency {result.ort_latency_ms:.2f} ms",
                  "ops: " + ", ".join(f"{op} {count}" for op, count in
                                      sorted(result.op_histogram.items(),
                                             key=lambda item: -item[1])[:8])]
    else:
        progress("saving the optimized program and loading it back")
        save_pt2(optimized, output_path, args, kwargs)
        lines.append(f"wrote {output} ({os.path.getsize(output_path) / 1e6:.1f} MB; load with "
                     f"`import attnopt; torch.export.load(path)`)")
    lines.append(f"done in {time.perf_counter() - started:.1f} s")
    return "\n".join(lines)


def _load(source: str, seq_len: int, batch: int):
    from attnopt.checkpoints import CheckpointError, example_inputs, load_hf_model
    path = Path(source)
    if path.suffix == ".pt2" and path.is_file():
        program = torch.export.load(str(path))
        if program.example_inputs is None:
            raise CheckpointError(f"{source} carries no example inputs to trace and check with; "
                                  "save it from torch.export.export with its example inputs")
        args, kwargs = program.example_inputs
        return program.module(), tuple(args), dict(kwargs)
    model = load_hf_model(source)
    kwargs = example_inputs(model, batch=batch, seq_len=seq_len)
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs["use_cache"] = False  # no KV cache in a converted graph
    return model, (), kwargs


def save_pt2(optimized, path: Path, args: tuple, kwargs: dict) -> None:
    """Save the optimized graph as an ExportedProgram, checked after loading it back."""
    from attnopt.onnx_export import rewritten_graph
    graph = rewritten_graph(optimized, args, kwargs, dynamic=False)
    program = torch.export.export(graph, args, kwargs, strict=False)
    handle, temporary = tempfile.mkstemp(suffix=".partial.pt2", dir=path.parent)
    os.close(handle)
    try:
        torch.export.save(program, temporary)
        loaded = torch.export.load(temporary).module()
        with torch.no_grad():
            stats = compare_outputs(loaded(*args, **kwargs), optimized(*args, **kwargs))
        if not stats.passed:
            raise VerificationError("the saved program's outputs differ from the optimized "
                                    "model's; nothing was written",
                                    format_table([("saved program", stats)]))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


BENCH_RUNS = 10


def bench(source: str, *, policy: str = "exact", seq_len: int = 128, batch: int = 1,
          runs: int = BENCH_RUNS, onnx: bool = True) -> str:
    """Latency of the original vs the optimized model, in PyTorch and (with `onnx`) in
    onnxruntime, one process, medians of `runs` calls after warm-ups; a markdown table."""
    from attnopt.api import optimize
    from attnopt.onnx_export import export_onnx

    model, args, kwargs = _load(source, seq_len, batch)
    optimized = optimize(model, policy, example_inputs=args or None, example_kwargs=kwargs,
                         capture="whole")

    with torch.no_grad():
        rows = [("PyTorch", median_ms(lambda: model(*args, **kwargs), runs),
                 median_ms(lambda: optimized(*args, **kwargs), runs))]
    if onnx:
        with tempfile.TemporaryDirectory() as directory:
            original = export_onnx(model, os.path.join(directory, "original.onnx"),
                                   example_inputs=args or None, example_kwargs=kwargs,
                                   latency_runs=runs)
            rewritten = export_onnx(optimized, os.path.join(directory, "optimized.onnx"),
                                    example_inputs=args or None, example_kwargs=kwargs,
                                    latency_runs=runs)
            rows.append(("onnxruntime", original.ort_latency_ms, rewritten.ort_latency_ms))
    sites = len(optimized.report.rewritten)
    lines = [f"{source}: batch {batch}, sequence {seq_len}, policy {policy!r}, {sites} site(s) "
             f"rewritten; medians of {runs} runs", "",
             "| runtime | original ms | optimized ms | speedup |", "|---|---|---|---|"]
    lines += [f"| {name} | {before:.2f} | {after:.2f} | {before / after:.2f}× |"
              for name, before, after in rows]
    return "\n".join(lines)
