"""Capture: turn a model (or its attention-bearing submodules) into exported fx graphs.

Two strategies:
  * whole model — `torch.export.export` (non-strict) of the model on its example inputs;
  * submodules — when whole-model capture fails (Hugging Face decoders return cache objects,
    `generate()` loops, Python control flow) or when asked: one run of the model with forward
    hooks records each submodule's inputs and which module called softmax/SDPA; each such
    module (walking up to its parent while it cannot be captured or holds no complete site)
    is exported on its own recorded inputs.

Dims are captured dynamic (`Dim.AUTO`) where export allows, static otherwise; the record says
which and why.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from attnopt.errors import CaptureError

#: Names of the torch functions whose callers are attention-bearing modules.
ATTENTION_FUNCTION_NAMES = frozenset({"softmax", "_softmax", "scaled_dot_product_attention"})


@dataclass
class CapturedProgram:
    path: str                 # "" for the whole model
    module: nn.Module
    exported: ExportedProgram
    args: tuple
    kwargs: dict
    dynamic: bool
    note: str = ""


def leading_dims_dynamic(module: nn.Module, args: tuple, kwargs: dict):
    """`Dim.AUTO` on the leading dims of every tensor input, keyed as torch.export expects."""
    def spec(leaf):
        # The last dim of float tensors of 3+ dims (features, head dim) stays static: weights
        # fix it in real models, and a symbolic head dim would turn the attention scale into a
        # graph expression. Sizes 0 and 1 are specialized by export anyway.
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return None
        sizes = leaf.shape[:-1] if leaf.is_floating_point() and leaf.dim() >= 3 else leaf.shape
        return {i: Dim.AUTO for i, size in enumerate(sizes) if size > 1}
    if not kwargs:
        return tuple(pytree.tree_map(spec, a) for a in args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    specs = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(module.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            specs[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        else:
            specs[name] = pytree.tree_map(spec, value)
    return specs


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:limit] + ('…' if len(line) > limit else '')}"


def export_module(module: nn.Module, args: tuple, kwargs: dict, path: str = "",
                  dynamic: bool = True, dynamic_shapes=None) -> CapturedProgram:
    """Export `module` on (args, kwargs); dynamic dims where export allows, else static.

    `dynamic_shapes` overrides the default spec (see `leading_dims_dynamic`).
    """
    where = f"submodule `{path}` ({type(module).__name__})" if path else \
        f"the model ({type(module).__name__})"
    note = ""
    if dynamic:
        try:
            exported = _export(module, args, kwargs, where,
                               dynamic_shapes if dynamic_shapes is not None
                               else leading_dims_dynamic(module, args, kwargs))
            return CapturedProgram(path, module, exported, args, kwargs, True)
        except CaptureError:
            raise
        except Exception as error:  # noqa: BLE001 - retried statically, reason recorded
            note = f"dynamic capture failed ({_first_line(error)}); captured static shapes"
    try:
        exported = _export(module, args, kwargs, where, None)
    except CaptureError:
        raise
    except Exception as error:
        raise CaptureError(
            f"could not capture {where} with torch.export: {_first_line(error)}. "
            "Try capture='submodules', pass example inputs the model accepts, or call the "
            "model without arguments that return non-tensor objects (e.g. use_cache=False)."
        ) from error
    return CapturedProgram(path, module, exported, args, kwargs, False, note)


#: torch.export's warning when forward assigns a tensor attribute: the graph drops that store.
_ASSIGNED_ATTRIBUTE = re.compile(r"tensor attribute (\S+) was assigned during export")


def _export(module, args, kwargs, where: str, dynamic_shapes) -> ExportedProgram:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = torch.export.export(module, args, kwargs, strict=False,
                                       dynamic_shapes=dynamic_shapes)
    stored = sorted({m.group(1) for w in caught
                     for m in [_ASSIGNED_ATTRIBUTE.search(str(w.message))] if m})
    if stored:
        raise CaptureError(f"{where} assigns tensor attribute(s) {', '.join(stored)} during "
                           "forward (e.g. stored attention weights); a captured graph would "
                           "drop that side effect, so it is left as written")
    for w in caught:  # everything else export had to say, as it would have said it
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return exported


# --------------------------------------------------------------------------------------------
# recording submodule calls


@dataclass
class CallRecord:
    path: str
    module: nn.Module
    args: tuple
    kwargs: dict


@dataclass
class Recording:
    calls: dict[str, CallRecord] = field(default_factory=dict)
    attention_callers: list[str] = field(default_factory=list)  # innermost module paths
    call_counts: dict[str, int] = field(default_factory=dict)


class _AttentionCallSpy(TorchFunctionMode):
    def __init__(self, stack: list[str], hits: list[str]):
        super().__init__()
        self.stack, self.hits = stack, hits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ATTENTION_FUNCTION_NAMES and self.stack:
            if self.stack[-1] not in self.hits:
                self.hits.append(self.stack[-1])
        return func(*args, **(kwargs or {}))


def record_calls(model: nn.Module, args: tuple, kwargs: dict) -> Recording:
    """Run the model once; record each submodule's first inputs and attention callers."""
    recording = Recording()
    stack: list[str] = []
    handles = []

    def pre_hook(path):
        def hook(module, hook_args, hook_kwargs):
            stack.append(path)
            recording.call_counts[path] = recording.call_counts.get(path, 0) + 1
            if path not in recording.calls:
                recording.calls[path] = CallRecord(path, module, tuple(hook_args),
                                                   dict(hook_kwargs))
        return hook

    def post_hook(module, hook_args, hook_kwargs, output):
        stack.pop()

    for path, module in model.named_modules():
        if not path:
            continue
        handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True,
                                                    always_call=True))
    try:
        with torch.no_grad(), _AttentionCallSpy(stack, recording.attention_callers):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return recording


def candidate_paths(path: str) -> list[str]:
    """`a.b.c` → [`a.b.c`, `a.b`, `a`]: the module and its ancestors below the root."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def has_cache_like_input(record: CallRecord) -> Optional[str]:
    """Name of an input that is a stateful non-tensor object (e.g. a KV cache), if any."""
    for key, value in list(enumerate(record.args)) + list(record.kwargs.items()):
        leaves = pytree.tree_leaves(value)
        for leaf in leaves:
            if leaf is None or isinstance(leaf, (torch.Tensor, int, float, bool, str)):
                continue
            return f"{key}: {type(leaf).__name__}"
    return None
