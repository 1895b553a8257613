"""ONNX export of optimized models, checked in onnxruntime against PyTorch.

`export_onnx` turns an `OptimizedModule` (or a plain model) into an ONNX file:

1. the graph: for an `OptimizedModule`, the model is captured whole once more for the given
   examples (with dynamic batch and sequence dims unless `dynamic=False`) and run through the
   same passes under the module's policy, so the exported graph holds the attnopt ops; a plain
   model is exported as it is;
2. `torch.onnx.export(dynamo=True)` with a translation for every attnopt op (each op module
   owns its translations): with `target="onnx"` exact sites become the standard `Attention` op
   at opset >= 23 and standard decomposed ops (MatMul, Softmax, Where) below; with
   `target="ort"` onnxruntime's fused `com.microsoft.GroupQueryAttention` (causal, grouped or
   soft-capped self-attention) or `MultiHeadAttention` (the rest with equal head counts),
   decomposed ops elsewhere; the approximate ops keep their blocked O(n) forms
   (`ops.blocked_onnx`) in every target;
3. `onnx.checker`, then onnxruntime on the examples and fresh random draws, compared with the
   PyTorch model under the verification tolerances. The file is written to a temporary name in
   the target directory and renamed only when every check passed: no partial output, ever.

The result carries the errors, an op histogram, the file size and onnxruntime's latency.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from attnopt.capture import leading_dims_dynamic
from attnopt.errors import CaptureError, VerificationError
from attnopt.ops import APPROXIMATE_OPS, ATTENTION_OP, INT8_LINEAR_OP
from attnopt.ops.hybrid import onnx_performer_window
from attnopt.ops.linear import onnx_linear_attention
from attnopt.ops.performer import onnx_performer
from attnopt.ops.quantized import onnx_int8_qk_attention
from attnopt.ops.sparse import onnx_sparse_attention
from attnopt.ops.int8 import onnx_int8_linear
from attnopt.ops.topk import onnx_topk_attention
from attnopt.timing import median_ms
from attnopt.ops.attention import onnx_attention_decomposed, onnx_attention_ort, \
    onnx_attention_standard
from attnopt.verify import ErrorStats, compare_outputs, format_table, input_draws

#: opsets this exporter writes: 18 is the oldest the decomposed translation uses, 23 brings the
#: standard Attention op
MIN_OPSET, ATTENTION_OPSET, DEFAULT_OPSET = 18, 23, 23
TARGETS = ("onnx", "ort")
LATENCY_RUNS = 10
#: How far onnxruntime's outputs may be from PyTorch's (normwise relative error) for a graph
#: with int8 projections: onnxruntime fuses DequantizeLinear + MatMul into its own int8 kernel
#: (MatMulNBits, which also quantizes the activations), so the two agree within quantization
#: error, not float round-off. Measured ≤ 1.5% on the test models (docs/COMPRESSION.md).
INT8_ONNX_REL_ERR = 0.05


@dataclass
class ExportResult:
    path: str
    opset: int
    target: str
    dynamic: bool
    errors: list[tuple[str, ErrorStats]] = field(default_factory=list)
    op_histogram: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    ort_latency_ms: Optional[float] = None
    quantized: bool = False  # int8 projections: judged against INT8_ONNX_REL_ERR
    workarounds: list[str] = field(default_factory=list)  # what was done around exporter bugs

    @property
    def passed(self) -> bool:
        if self.quantized:
            return all(s.finite_ok and s.rel_err <= INT8_ONNX_REL_ERR for _, s in self.errors)
        return all(stats.passed for _, stats in self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "opset": self.opset, "target": self.target,
                "dynamic": self.dynamic, "passed": self.passed,
                "errors": {name: {"max_abs_err": s.max_abs_err, "max_rel_err": s.max_rel_err,
                                  "cosine": s.cosine, "passed": s.passed}
                           for name, s in self.errors},
                "op_histogram": dict(self.op_histogram), "file_bytes": self.file_bytes,
                "quantized": self.quantized, "workarounds": list(self.workarounds),
                "ort_latency_ms": self.ort_latency_ms}


#: The approximate ops and the int8 projection translate to standard opset-18 ops for every
#: target.
APPROXIMATE_TRANSLATIONS = {
    APPROXIMATE_OPS["performer"]: onnx_performer,
    APPROXIMATE_OPS["linear"]: onnx_linear_attention,
    APPROXIMATE_OPS["sparse"]: onnx_sparse_attention,
    APPROXIMATE_OPS["hybrid"]: onnx_performer_window,
    APPROXIMATE_OPS["topk"]: onnx_topk_attention,
    APPROXIMATE_OPS["int8_qk"]: onnx_int8_qk_attention,
    INT8_LINEAR_OP: onnx_int8_linear,
}


def translation_table(opset: int, target: str = "onnx") -> dict:
    """The ONNX translation of every attnopt op for this opset and target: "onnx" — standard
    ops only; "ort" — onnxruntime's fused contrib ops where they express the call."""
    if target == "ort":
        exact = onnx_attention_ort
    else:
        exact = onnx_attention_standard if opset >= ATTENTION_OPSET \
            else onnx_attention_decomposed
    return {ATTENTION_OP: exact, **APPROXIMATE_TRANSLATIONS}


def export_onnx(model: nn.Module, path: str, *, example_inputs=None,
                example_kwargs: Optional[dict] = None, opset: Optional[int] = None,
                target: str = "onnx", dynamic: bool = True, verify: bool = True,
                draws: int = 2, latency_runs: int = LATENCY_RUNS,
                progress: Callable[[str], None] = lambda step: None) -> ExportResult:
    """Export `model` to ONNX at `path` and check it in onnxruntime (see module docstring).

    `progress(step)` is called as each long step starts (the CLI prints them).
    Raises ValueError for bad arguments, CaptureError when the model cannot be captured whole,
    VerificationError when onnxruntime's outputs differ from PyTorch's (nothing is written).
    """
    from attnopt.api import OptimizedModule, _as_args  # api imports this module's callers

    args = _as_args(example_inputs) if example_inputs is not None else ()
    kwargs = dict(example_kwargs or {})
    if not args and not kwargs:
        raise ValueError("export_onnx needs example inputs (example_inputs=... or "
                         "example_kwargs=...) to trace the model and check the exported file")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: attnopt exports opset {MIN_OPSET} or newer "
                         f"(the standard Attention op needs {ATTENTION_OPSET})")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {path}: directory {directory} does not exist")

    progress("capturing the model for export")
    graph = rewritten_graph(model, args, kwargs, dynamic) \
        if isinstance(model, OptimizedModule) else model
    dynamic_shapes = None
    if dynamic:
        source = model._orig_mod if isinstance(model, OptimizedModule) else model
        dynamic_shapes = leading_dims_dynamic(source, args, kwargs)
    progress(f"exporting to ONNX (opset {opset}, target {target})")
    def export(optimize: bool):
        with warnings.catch_warnings():
            # the captured graph of an eval-mode model carries no train/eval flag of its own
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training")
            return torch.onnx.export(graph, args, kwargs=kwargs, dynamo=True,
                                     opset_version=opset, dynamic_shapes=dynamic_shapes,
                                     verbose=False, optimize=optimize,
                                     custom_translation_table=translation_table(opset, target))

    program = export(optimize=True)
    workarounds = []
    if _fused_rotary(program):
        program = export(optimize=False)
        workarounds.append("exported without torch.onnx's graph optimizer: its RoPE fusion "
                           "(RotaryEmbedding) makes graphs onnxruntime rejects")

    nodes = graph.graph.nodes if isinstance(graph, torch.fx.GraphModule) else ()
    result = ExportResult(path, opset, target, dynamic,
                          quantized=any(node.target is INT8_LINEAR_OP for node in nodes),
                          workarounds=workarounds)
    handle, temporary = tempfile.mkstemp(suffix=".onnx.tmp", dir=directory)
    os.close(handle)
    try:
        program.save(temporary)
        import onnx
        onnx.checker.check_model(temporary)
        result.op_histogram = dict(Counter(node.op_type for node in program.model.graph))
        result.file_bytes = os.path.getsize(temporary)
        if verify:
            progress(f"checking in onnxruntime against PyTorch ({draws + 1} input sets)")
            result.errors = _compare_with_pytorch(model, program, args, kwargs, draws)
            if not result.passed:
                raise VerificationError("onnxruntime's outputs differ from PyTorch's beyond "
                                        "tolerance; nothing was written",
                                        format_table(result.errors))
        # warm-ups include session creation and first-run allocations
        result.ort_latency_ms = median_ms(lambda: program(*args, **kwargs), latency_runs)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return result


def _fused_rotary(program) -> bool:
    """Whether the exporter's optimizer fused RoPE into `RotaryEmbedding`. onnxruntime 1.32
    rejects the nodes it writes in two cases met so far ("cos_cache and sin_cache are expected
    to have the same shape as input x"): dynamic shapes at opset 23 with one kv head (what GQA
    conversion and head pruning can leave), and a plain Llama exported with a dynamic batch
    (the cos/sin tables keep the position ids' batch of 1). Graphs without the fusion run, so
    any fused graph is exported again without it."""
    return any(node.op_type == "RotaryEmbedding" for node in program.model.graph)


def rewritten_graph(model, args, kwargs, dynamic: bool) -> nn.Module:
    """An OptimizedModule's model captured whole for these examples and rewritten under its
    policy: a graph module holding the attnopt ops, ready to export."""
    from attnopt.capture import export_module
    from attnopt.region import build_region
    state = model._attnopt_state
    try:
        captured = export_module(model._orig_mod, args, kwargs, dynamic=dynamic)
    except CaptureError as error:
        raise CaptureError(f"export_onnx needs the whole model captured by torch.export: "
                           f"{error}") from error
    with torch.no_grad():
        # the guard's rollbacks stay exact: what is exported is what was verified
        return build_region(captured, state.policy, verify_each=False,
                            exact_sites=state.rollbacks, loss=state.loss).rewritten


def _compare_with_pytorch(model, program, args, kwargs, draws) -> list[tuple[str, ErrorStats]]:
    rows = []
    for index, (draw_args, draw_kwargs) in enumerate(input_draws(args, kwargs, draws)):
        with torch.no_grad():
            expected = model(*draw_args, **draw_kwargs)
        actual = program(*draw_args, **draw_kwargs)
        name = "examples" if index == 0 else f"draw {index}"
        rows.append((name, compare_outputs(list(actual), _flat_outputs(expected))))
    return rows


def _flat_outputs(output) -> list:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


