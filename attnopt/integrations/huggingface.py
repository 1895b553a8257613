"""Hugging Face transformers: rewrite attention *functions*, below the KV-cache update.

A decoder called with its default arguments passes a `DynamicCache` to every attention module,
which appends the new keys and values (`past_key_values.update(...)`) before attending. Neither
the model nor those modules can be exported. But every transformers attention module then calls
an attention function with tensors only —
`attention_interface(module, query, key, value, attention_mask, dropout=..., scaling=..., ...)`
— which is the whole attention site and nothing stateful.

This strategy records the first call of that function per attention module, exports it (wrapped
in `AttentionCall`), runs the usual passes and verification, and installs a dispatcher in place
of the function (the modeling file's `eager_attention_forward` and the `AttentionInterface`
entry of the model's implementation). The dispatcher runs the rewritten graph for modules it
knows and input signatures their graphs accept; a new signature (the one-token decode step of
`generate()`, say) is captured and verified on first sight; everything else — other models,
unverifiable calls — runs the original function. Output attention weights are not produced by
rewritten calls (returned as None, as transformers' SDPA path does).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from attnopt.region import RegionCache

#: Name of the attention function each transformers modeling file defines for "eager".
EAGER_FUNCTION = "eager_attention_forward"


def is_transformers_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "_attn_implementation") and \
        type(model).__module__.startswith("transformers.")


class AttentionCall(nn.Module):
    """One attention-function call as a module: tensors in, the attention output out."""

    def __init__(self, function: Callable, target: nn.Module, constants: dict[str, Any]):
        super().__init__()
        object.__setattr__(self, "function", function)  # not submodules: nothing to export
        object.__setattr__(self, "target", target)
        self.constants = constants

    def forward(self, query, key, value, attention_mask, tensors: dict):
        return self.function(self.target, query, key, value, attention_mask,
                             **self.constants, **tensors)[0]


def dynamic_spec(args: tuple) -> tuple:
    """Export spec for AttentionCall inputs: q, k, v keep their head dim static (the scale
    depends on it); every other dim of size > 1, the mask's key length included, is dynamic."""
    from torch.export import Dim

    def spec(tensor, keep_last_static: bool):
        if not isinstance(tensor, torch.Tensor):
            return None
        sizes = tensor.shape[:-1] if keep_last_static else tensor.shape
        return {i: Dim.AUTO for i, size in enumerate(sizes) if size > 1}

    query, key, value, attention_mask, tensors = args
    return (spec(query, True), spec(key, True), spec(value, True),
            spec(attention_mask, False), {k: spec(v, False) for k, v in tensors.items()})


def split_call(query, key, value, attention_mask, kwargs: dict) -> tuple[tuple, dict]:
    """(args for AttentionCall.forward, non-tensor constants) of one function call."""
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return (query, key, value, attention_mask, tensors), constants


@dataclass
class RecordedCall:
    module: nn.Module
    function: Callable
    args: tuple
    constants: dict


@dataclass
class ModuleAttention:
    """What the dispatcher knows about one attention module."""

    path: str
    build: Callable  # (AttentionCall, args, path) -> region or None
    cache: RegionCache = field(default_factory=RegionCache)  # tagged by the call's constants
    guard_fallbacks: int = 0
    #: True: the module's calls always dispatch (the attention-functions strategy, installed in
    #: place after verification). False: only inside `dispatching()` (an OptimizedModule's
    #: methods such as generate()), so the user's model called directly is unchanged.
    always: bool = True

    def run(self, function, module, query, key, value, attention_mask, kwargs):
        args, constants = split_call(query, key, value, attention_mask, kwargs)

        def build(args, _kwargs, constants):
            return self.build(AttentionCall(function, module, constants), args, self.path)

        region = self.cache.find(args, {}, build, tag=constants)
        if region is None:
            return None
        try:
            return region.run(args)
        except Exception:  # noqa: BLE001 - export's guards refused these inputs
            self.guard_fallbacks += 1  # (e.g. q, k, v aliasing differs from capture)
            return None


# --------------------------------------------------------------------------------------------
# the dispatcher and where it is installed

_MODULES: "weakref.WeakKeyDictionary[nn.Module, ModuleAttention]" = weakref.WeakKeyDictionary()
_recording: Optional[dict] = None


_dispatching: contextvars.ContextVar[bool] = contextvars.ContextVar("attnopt_dispatching",
                                                                     default=False)


@contextlib.contextmanager
def dispatching():
    """Within this context, modules registered with `always=False` dispatch too."""
    token = _dispatching.set(True)
    try:
        yield
    finally:
        _dispatching.reset(token)


def _tracing(tensor) -> bool:
    """True while torch.export / torch.compile traces: run the original, never a capture."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return isinstance(tensor, (FakeTensor, FunctionalTensor)) or \
        any(isinstance(size, torch.SymInt) for size in tensor.shape)


def _dispatcher(original: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        state = _MODULES.get(module)
        if state is not None and not args and (state.always or _dispatching.get()) and \
                not _tracing(query):
            output = state.run(original, module, query, key, value, attention_mask, kwargs)
            if output is not None:
                return output, None
        if _recording is not None and module not in _recording and not args:
            call_args, constants = split_call(query, key, value, attention_mask, kwargs)
            _recording[module] = RecordedCall(module, original, call_args, constants)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__attnopt_original__ = original
    return attention


def _function_slots(model: nn.Module) -> list[tuple[Any, str]]:
    """(namespace, name) pairs through which the model's attention modules find their function."""
    slots = []
    implementation = model.config._attn_implementation
    if implementation and implementation != "eager":
        from transformers.modeling_utils import AttentionInterface
        if implementation in AttentionInterface._global_mapping:
            slots.append((AttentionInterface._global_mapping, implementation))
    seen = set()
    for module in model.modules():
        namespace = sys.modules.get(type(module).__module__)
        if namespace is not None and id(namespace) not in seen and \
                callable(getattr(namespace, EAGER_FUNCTION, None)):
            seen.add(id(namespace))
            slots.append((namespace, EAGER_FUNCTION))
    return slots


def _get(slot):
    namespace, name = slot
    return namespace[name] if isinstance(namespace, dict) else getattr(namespace, name)


def _set(slot, value) -> None:
    namespace, name = slot
    if isinstance(namespace, dict):
        namespace[name] = value
    else:
        setattr(namespace, name, value)


def install_dispatchers(model: nn.Module) -> None:
    """Put the dispatcher in every slot (idempotent); unknown modules still run the original."""
    for slot in _function_slots(model):
        current = _get(slot)
        if not hasattr(current, "__attnopt_original__"):
            _set(slot, _dispatcher(current))


def remove_dispatchers_if_unused(model: nn.Module) -> None:
    """Restore the original function in each of `model`'s slots that no registered module
    (of any live model) reaches — after `inspect()`, say, or when nothing verified."""
    if not is_transformers_model(model):
        return
    in_use = set()
    for module in list(_MODULES.keys()):
        namespace = sys.modules.get(type(module).__module__)
        in_use.add((id(namespace), EAGER_FUNCTION))
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if implementation:
            from transformers.modeling_utils import AttentionInterface
            in_use.add((id(AttentionInterface._global_mapping), implementation))
    for slot in _function_slots(model):
        original = getattr(_get(slot), "__attnopt_original__", None)
        if original is not None and (id(slot[0]), slot[1]) not in in_use:
            _set(slot, original)


def record_function_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Run the model once; the first attention-function call of each attention module."""
    global _recording
    install_dispatchers(model)
    _recording = {}
    try:
        with torch.no_grad():
            model(*args, **kwargs)
        return _recording
    finally:
        _recording = None


def register(module: nn.Module, state: ModuleAttention) -> None:
    _MODULES[module] = state


def guard_fallbacks(model: nn.Module) -> int:
    """Calls in `model` that ran the original function because a graph's guards refused them."""
    return sum(_MODULES[m].guard_fallbacks for m in model.modules() if m in _MODULES)

