"""When the kernels autotune, which config they launch with, and launching them cheaply.

Autotuning benchmarks every candidate config on the first call of each specialization and shape
bucket: worth it for the hot paths (fp16/bf16 without a bias tensor, soft-cap or layout, ALiBi
slopes included — what models run at scale) and not for the long tail of specializations, where
compiling ten configs would cost more than it saves. Those launch the first config their pruning
keeps (the config lists are ordered best-first from the H100 measurements in
docs/BENCHMARKS.md). `ATTNOPT_AUTOTUNE=0` turns autotuning off everywhere (tests do, to compile
once per case).

Either way the chosen config is remembered under the caller's key (dtype, flags, shape
buckets), and later calls launch the kernel directly with it: Triton's autotuner re-derives
its key from every argument on every call, which for kernels with ~60 arguments costs more
CPU time than a decode step's GPU time.

Past the autotuner, Triton's `JITFunction.run` still binds every argument and specializes it
in Python on every call (56–84 µs of host time per launch of the forward kernel on the H100's
host, docs/BENCHMARKS.md). So the compiled kernel it returns is kept too (`_DirectLaunch`),
under the current device and the argument properties Triton specializes on — each tensor's
dtype and 16-byte alignment, each integer's equality to 1, divisibility by 16 and width — and a
later call with the same ones launches that kernel straight away. A call with new
properties goes through Triton (which compiles or finds its kernel) and is kept in turn.
`ATTNOPT_DIRECT_LAUNCH=0` turns this off; the Triton interpreter never uses it.

Working out those properties is itself a loop over every argument (about 30 µs of a backward
launch's host time on the H100's host), so a repeat call is first looked up by value
(`_ValueKey`): its scalars as they are, its tensors' dtypes and alignment, its descriptors'
blocks and layouts — the same values mean the same properties. Only new values pay for the
full properties, and are remembered in turn (a bounded number per kernel).

Sequence lengths are compiled into a kernel the way torch.compile treats shapes: static first,
dynamic once they change (`specialize`). The first lengths a kernel sees under a key become
constants (loop bounds and block counts fold; the backward at head dim 128 and 1K ran 3-7%
faster on an H100, docs/BENCHMARKS.md); calls with other lengths run a second compile that
reads them at run time, so a workload of many lengths costs one extra compile, not one per
length.
`ATTNOPT_STATIC_LENGTHS=0` compiles only the run-time version. (Calls with a bias tensor
never specialize: `AttentionParams.static_lengths`.)
"""

from __future__ import annotations

import operator
import os
from typing import Optional

import torch

AUTOTUNE_ENV = "ATTNOPT_AUTOTUNE"
DIRECT_LAUNCH_ENV = "ATTNOPT_DIRECT_LAUNCH"
STATIC_LENGTHS_ENV = "ATTNOPT_STATIC_LENGTHS"

#: (kernel, caller key, constexprs, tuning requested) -> (config, its launch options, tuned?)
_chosen: dict = {}
#: the same keys -> _DirectLaunch (None where direct launches are off)
_direct: dict = {}
#: the same keys -> the `specialize` values compiled in as constants under that key
_static: dict = {}


def autotuning_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def launch(kernel, grid, args: tuple, kwargs: dict, *, key: tuple, tune: bool, prune,
           specialize: Optional[dict] = None) -> None:
    """Run an `@triton.autotune` kernel with the config chosen for `key`: autotuned on first
    sight when `tune` (and enabled), else the first config `prune(configs, named, **kwargs)`
    keeps. `key` (with the UPPER_CASE constexpr kwargs, added here) must determine everything the
    kernel's own autotune key reads: dtypes and shape buckets. `ATTNOPT_AUTOTUNE` is read when a
    key is first launched.

    `specialize`: constexpr parameters (name -> value, 0 meaning "read at run time") that are
    compiled in as given for the first values seen under this key and as 0 for any others
    (module docstring). They do not take part in choosing the config."""
    constexprs = tuple(item for item in kwargs.items() if item[0].isupper())
    cache_key = (id(kernel), key, constexprs, tune)
    if specialize:
        kwargs = {**kwargs, **_specialized(cache_key, specialize)}
    chosen = _chosen.get(cache_key)
    if chosen is None:
        if tune and autotuning_enabled():
            kernel[grid](*args, **kwargs)
            _chosen[cache_key] = (kernel.best_config, _launch_options(kernel.best_config), True)
            return
        config = prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)[0]
        chosen = _chosen[cache_key] = (config, _launch_options(config), False)
    if specialize:
        cache_key += tuple(kwargs[name] for name in specialize)
    _run(kernel.fn, cache_key, grid, args, kwargs, chosen[1])


def _specialized(cache_key: tuple, values: dict) -> dict:
    """`values` where they are the first seen under `cache_key`, else zeros."""
    if os.environ.get(STATIC_LENGTHS_ENV, "1") == "0":
        return dict.fromkeys(values, 0)
    first = _static.setdefault(cache_key, values)
    return values if first == values else dict.fromkeys(values, 0)


def launch_fixed(fn, grid, args: tuple, kwargs: dict, **options) -> None:
    """Run a plain `@triton.jit` kernel (one config: launch `options` such as num_warps) as
    `fn[grid](*args, **kwargs, **options)` does, past Triton's binding once its compiled
    kernel is known for these arguments' properties."""
    cache_key = (id(fn), tuple(item for item in kwargs.items() if item[0].isupper()),
                 tuple(sorted(options.items())))
    _run(fn, cache_key, grid, args, kwargs, options)


def _run(fn, cache_key, grid, args, kwargs, options) -> None:
    direct = _direct.get(cache_key)
    if direct is None and cache_key not in _direct:
        direct = _direct[cache_key] = _DirectLaunch.create(fn, len(args), kwargs, options)
    if direct is not None and direct.launch(grid, args, kwargs):
        return
    compiled = fn[grid](*args, **kwargs, **options)
    if direct is not None:
        direct.keep(compiled, args, kwargs)


class _DirectLaunch:
    """Launches of one kernel and config, past Triton's per-call binding (module docstring).

    `names`: the kernel's parameters in order; the first `positional` come as positional
    arguments, the rest by keyword or from `fixed` (the config's and launch options' values,
    and defaults). `runtime`: the indices of parameters that are not constexprs, whose
    properties (`_properties`) select a compiled kernel; `by_value` finds it for values seen
    before (`_ValueKey`)."""

    #: values remembered per kernel and config before the table starts over (a decode loop
    #: with a growing cache brings new lengths on every step)
    REMEMBERED = 512

    def __init__(self, names, positional, runtime, fixed, meta, name: str = ""):
        self.names, self.positional, self.runtime = names, positional, runtime
        self.fixed, self.meta, self.name = fixed, meta, name
        self.compiled: dict = {}   # (device, properties) -> compiled kernel
        self.by_value: dict = {}   # (device, _ValueKey(values)) -> compiled kernel
        self.value_key: Optional[_ValueKey] = None

    @classmethod
    def create(cls, fn, positional: int, kwargs: dict, options: dict):
        if os.environ.get(DIRECT_LAUNCH_ENV, "1") == "0" or not hasattr(fn, "params"):
            return None  # turned off, or the interpreter's function
        from attnopt.kernels.params import interpreting
        if interpreting():
            return None
        names = [p.name for p in fn.params]
        fixed = {p.name: p.default for p in fn.params
                 if getattr(p, "has_default", False)}
        fixed.update(options)
        runtime = [i for i, p in enumerate(fn.params) if not p.is_constexpr]
        meta = {name: value for name, value in {**fixed, **kwargs}.items() if name.isupper()}
        return cls(names, positional, runtime, fixed, meta, getattr(fn, "__name__", ""))

    def values(self, args, kwargs) -> list:
        values = list(args)
        for name in self.names[self.positional:]:
            values.append(kwargs[name] if name in kwargs else self.fixed[name])
        return values

    def key(self, values) -> tuple:
        """The compiled kernel's key: the current device (Triton compiles and loads per
        device) and the arguments' properties."""
        return torch.cuda.current_device(), _properties(values, self.runtime)

    def find(self, values):
        """The kept kernel for these arguments, or None."""
        value = self.value_key(values) if self.value_key is not None else None
        if value is None:  # no key by value for these arguments
            return self.compiled.get(self.key(values))
        by_value = torch.cuda.current_device(), value
        compiled = self.by_value.get(by_value)
        if compiled is None:
            compiled = self.compiled.get(self.key(values))
            if compiled is not None:
                if len(self.by_value) >= self.REMEMBERED:
                    self.by_value.clear()
                self.by_value[by_value] = compiled
        return compiled

    def launch(self, grid, args, kwargs) -> bool:
        """Launch with a kept kernel; False when none fits these arguments."""
        values = self.values(args, kwargs)
        compiled = self.find(values)
        if compiled is None:
            return False
        grid = grid(self.meta) if callable(grid) else grid
        compiled[(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)](
            *values)
        return True

    def keep(self, compiled, args, kwargs) -> None:
        if compiled is None or not hasattr(compiled, "__getitem__"):
            return
        values = self.values(args, kwargs)
        key = self.key(values)
        if key[1] is not None:
            self.compiled[key] = compiled
            if self.value_key is None:
                self.value_key = _ValueKey.of(values, self.runtime)


class _ValueKey:
    """A repeat call's key by value (module docstring): scalars (ints, floats, bools, None) as
    they are with their types (1, 1.0 and True are equal keys otherwise), tensors as (dtype,
    16-byte aligned), TMA descriptors as (dtype, block, layout). The positions of each kind
    are the kernel's first call's; a call with anything else at a scalar's position, or no
    tensor or descriptor at theirs, gets None (and `_properties` decides): a key never holds
    a tensor."""

    def __init__(self, scalars, tensors, descriptors):
        self.scalars = _getter(scalars)
        self.tensors = _getter(tensors)
        self.descriptors = _getter(descriptors)

    @classmethod
    def of(cls, values, runtime) -> Optional["_ValueKey"]:
        scalars, tensors, descriptors = [], [], []
        for index in runtime:
            value = values[index]
            if type(value) in _SCALAR_TYPES:
                scalars.append(index)
            elif hasattr(value, "data_ptr"):
                tensors.append(index)
            elif hasattr(value, "block_shape") and hasattr(value, "base"):
                descriptors.append(index)
            else:
                return None
        return cls(scalars, tensors, descriptors)

    def __call__(self, values) -> Optional[tuple]:
        try:
            scalars = self.scalars(values)
            types = tuple(map(type, scalars))
            if not _SCALAR_TYPES.issuperset(types):
                return None
            return (scalars, types,
                    tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in self.tensors(values)]),
                    tuple([(d.base.dtype, tuple(d.block_shape), d.layout)
                           for d in self.descriptors(values)]))
        except AttributeError:  # a position of another kind than on the first call
            return None


_SCALAR_TYPES = frozenset((int, float, bool, type(None)))


def _getter(indices: list):
    """values -> the tuple of values[i] for i in indices."""
    if len(indices) >= 2:
        return operator.itemgetter(*indices)
    if indices:
        index = indices[0]
        return lambda values: (values[index], )
    return lambda values: ()


_I32 = (-2 ** 31, 2 ** 31 - 1)


def _properties(values: list, runtime: list):
    """What Triton specializes a compiled kernel on, for the runtime arguments (None: an
    argument of a kind this does not know, which always goes through Triton)."""
    properties = []
    for index in runtime:
        value = values[index]
        kind = type(value)
        if kind is bool or value is None:
            properties.append(value)
        elif kind is int:
            properties.append((value == 1, value % 16 == 0, _I32[0] <= value <= _I32[1],
                               value >= 2 ** 63))
        elif kind is float:
            properties.append(float)
        elif hasattr(value, "data_ptr"):
            properties.append((value.dtype, value.data_ptr() % 16 == 0))
        elif hasattr(value, "block_shape") and hasattr(value, "base"):
            # a TMA tensor descriptor: its kernel depends on the dtype, block and layout; the
            # address, shape and strides are encoded at each launch
            properties.append((value.base.dtype, tuple(value.block_shape), value.layout))
        else:
            return None
    return tuple(properties)


def _launch_options(config) -> dict:
    options = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if getattr(config, "maxnreg", None) is not None:
        options["maxnreg"] = config.maxnreg
    return options
