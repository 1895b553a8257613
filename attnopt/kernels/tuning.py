"""When the kernels autotune, which config they launch with, and launching them cheaply.

Autotuning benchmarks every candidate config on the first call of each specialization and
shape bucket: worth it for the hot paths (fp16/bf16 without bias, ALiBi, soft-cap or layout —
what models run at scale) and not for the long tail of specializations, where compiling ten
configs would cost more than it saves. Those launch the first config their pruning keeps (the
config lists are ordered best-first from the H100 measurements in docs/BENCHMARKS.md).
`ATTNOPT_AUTOTUNE=0` turns autotuning off everywhere (tests do, to compile once per case).

Either way the chosen config is remembered under the caller's key (dtype, flags, shape
buckets), and later calls launch the kernel directly with it: Triton's autotuner re-derives
its key from every argument on every call, which for kernels with ~60 arguments costs more
CPU time than a decode step's GPU time.
"""

from __future__ import annotations

import os

AUTOTUNE_ENV = "ATTNOPT_AUTOTUNE"

#: (kernel, caller key, constexprs, tuning requested) -> (config, its launch options, tuned?)
_chosen: dict = {}


def autotuning_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def launch(kernel, grid, args: tuple, kwargs: dict, *, key: tuple, tune: bool, prune) -> None:
    """Run an `@triton.autotune` kernel with the config chosen for `key`: autotuned on first
    sight when `tune` (and enabled), else the first config `prune(configs, named, **kwargs)`
    keeps. `key` (with the UPPER_CASE constexpr kwargs, added here) must determine everything the
    kernel's own autotune key reads: dtypes and shape buckets. `ATTNOPT_AUTOTUNE` is read when a
    key is first launched."""
    constexprs = tuple(item for item in kwargs.items() if item[0].isupper())
    cache_key = (id(kernel), key, constexprs, tune)
    chosen = _chosen.get(cache_key)
    if chosen is None:
        if tune and autotuning_enabled():
            kernel[grid](*args, **kwargs)
            _chosen[cache_key] = (kernel.best_config, _launch_options(kernel.best_config), True)
            return
        config = prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)[0]
        chosen = _chosen[cache_key] = (config, _launch_options(config), False)
    kernel.fn[grid](*args, **kwargs, **chosen[1])


def _launch_options(config) -> dict:
    options = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if getattr(config, "maxnreg", None) is not None:
        options["maxnreg"] = config.maxnreg
    return options
