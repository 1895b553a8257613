"""Cost of attention variants: analytic FLOPs, and latency calibrated on the running device.

`flop_ratio` estimates a rewritten site's arithmetic against exact attention from its shape
and the variant's parameters (reported per site). FLOPs do not predict time across variants
(memory traffic, kernel quality and launch overheads differ), so the length thresholds the
presets choose by come from `calibrate`, which times the variants on the device.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from attnopt.site import AttentionSite


def _exact_flops(q_len: int, kv_len: int, dim: int, v_dim: int, causal: bool) -> float:
    flops = 2.0 * q_len * kv_len * (dim + v_dim)
    return flops / 2 if causal else flops


def _kernelized_flops(q_len, kv_len, dim, v_dim, features, causal, chunk, feature_dim_cost):
    flops = feature_dim_cost * (q_len + kv_len) * features * dim
    flops += 2.0 * kv_len * features * (v_dim + 1) + 2.0 * q_len * features * (v_dim + 1)
    if causal:  # the masked products inside each chunk
        flops += q_len * chunk * (features + v_dim + 1)
    return flops


def variant_flops(variant: str, params: dict, site: AttentionSite) -> float:
    """FLOPs of one (batch, head) of the site under `variant` (exact for anything else)."""
    q_len, kv_len = site.q_len, site.kv_len
    dim, v_dim, causal = site.head_dim, site.v_head_dim, site.causal
    if variant == "performer":
        return _kernelized_flops(q_len, kv_len, dim, v_dim, params["features"], causal,
                                 params["chunk"], 2.0)
    if variant == "linear":
        return _kernelized_flops(q_len, kv_len, dim, v_dim, dim, causal, params["chunk"], 0.0)
    if variant == "sparse":
        from attnopt.ops.sparsity import SparsePattern, pattern_layout
        from attnopt.passes.approximate import sparse_pattern_args
        pattern = SparsePattern(*sparse_pattern_args(params, site))
        layout = pattern_layout(pattern, q_len, kv_len, causal=causal)
        kept = float(layout.float().mean()) * kv_len
        flops = 2.0 * q_len * kept * (dim + v_dim)
        return flops / 2 if causal and pattern.has_blocks else flops
    if variant == "hybrid":
        block = params["block"]
        local = -(-params["window"] // block)
        width = min(kv_len, (local * (1 if causal else 2) + 1) * block)
        return _kernelized_flops(q_len, kv_len, dim, v_dim, params["features"], False, 0,
                                 2.0) + 2.0 * q_len * width * (dim + v_dim)
    if variant == "topk":
        blocks = params["top_k"] + 1 + 2 * params["local"]
        kept = min(kv_len, blocks * params["block"])
        selection = 2.0 * (q_len / params["block"]) * (kv_len / params["block"]) * dim
        return 2.0 * q_len * kept * (dim + v_dim) + selection
    return _exact_flops(q_len, kv_len, dim, v_dim, causal)


def flop_ratio(variant: str, params: dict, site: AttentionSite) -> float:
    exact = _exact_flops(site.q_len, site.kv_len, site.head_dim, site.v_head_dim, site.causal)
    return variant_flops(variant, params, site) / max(exact, 1.0)


# ------------------------------------------------------------------------ calibrated latency

#: What the length-based presets choose between, timed with their default parameters.
CALIBRATED_VARIANTS = ("exact", "sparse", "hybrid", "performer")
#: Sequence lengths timed per device type (B=1; time scales with batch × heads).
CALIBRATION_LENGTHS = {"cpu": (512, 1024, 2048, 4096), "cuda": (1024, 4096, 16384, 32768)}
CACHE_ENV = "ATTNOPT_CACHE_DIR"


def _variant_call(variant: str, q, k, v, causal: bool):
    """A zero-argument callable running `variant` with the presets' default parameters."""
    import torch

    from attnopt.ops.features import draw_projection
    from attnopt.policy import VARIANT_DEFAULTS
    params = VARIANT_DEFAULTS.get(variant, {})
    ops = torch.ops.attnopt
    if variant == "exact":
        return lambda: ops.attention(q, k, v, None, causal)
    if variant == "sparse":
        from attnopt.ops.sparsity import SparsePattern
        pattern = SparsePattern.longformer(params["local"], params["global_blocks"],
                                           params["block"])
        return lambda: ops.sparse_attention(q, k, v, None, causal, None, False,
                                            *pattern.to_dict().values())
    projection = draw_projection(params["features"], q.shape[-1], 0).to(q.device)
    if variant == "hybrid":
        return lambda: ops.performer_window(q, k, v, projection, None, causal, None, False,
                                            params["window"], params["block"])
    if variant == "performer":
        return lambda: ops.performer(q, k, v, projection, None, causal, None, False,
                                     params["kernel"], params["chunk"])
    raise ValueError(f"no calibration for variant {variant!r}")


def _fit(lengths, times) -> tuple[float, float, float]:
    """Non-negative (a, b, c) of t(n) = a + b·n + c·n², least squares in relative error: the
    best fit over every subset of the three terms whose coefficients all come out >= 0."""
    import itertools

    import numpy as np
    n = np.asarray(lengths, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    columns = [np.ones_like(n), n, n * n]
    best, best_error = (float(t.min()), 0.0, 0.0), np.inf
    for size in (1, 2, 3):
        for subset in itertools.combinations(range(3), size):
            design = np.stack([columns[i] / t for i in subset], axis=1)
            solution, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
            if (solution < 0).any():
                continue
            error = float(((design @ solution - 1.0) ** 2).sum())
            if error < best_error - 1e-12:
                coefficients = [0.0, 0.0, 0.0]
                for index, value in zip(subset, solution):
                    coefficients[index] = float(value)
                best, best_error = tuple(coefficients), error
    return best


@dataclass
class Calibration:
    """Measured latency (ms, median) of each variant at a few lengths on one device, and the
    fitted t(n) = a + b·n + c·n² per variant that the presets choose thresholds from."""

    device: str
    dtype: str
    heads: int
    head_dim: int
    causal: bool
    torch_version: str
    lengths: list[int]
    times_ms: dict[str, list[float]]

    def coefficients(self, variant: str) -> tuple[float, float, float]:
        return _fit(self.lengths, self.times_ms[variant])

    def predict_ms(self, variant: str, length: int) -> float:
        a, b, c = self.coefficients(variant)
        return a + b * length + c * length * length

    def first_length(self, condition, start: int = 64, stop: int = 1 << 21) -> Optional[int]:
        """The smallest length on a fine geometric grid from which `condition(n)` holds for
        every larger grid length too (None: never)."""
        grid, n = [], float(start)
        while n <= stop:
            grid.append(int(n) // 16 * 16 or 16)
            n *= 1.0625
        found = None
        for length in reversed(grid):
            if not condition(length):
                break
            found = length
        return found

    def thresholds(self, min_speedup: float = 2.0) -> tuple[int, int]:
        """(T1, T2): sparse beats exact from T1 on; the hybrid runs at least `min_speedup`×
        faster than exact from T2 on (there its long-range estimate is affordable)."""
        t1 = self.first_length(lambda n: self.predict_ms("sparse", n) <
                               self.predict_ms("exact", n)) or (1 << 21)
        t2 = self.first_length(lambda n: self.predict_ms("hybrid", n) * min_speedup <=
                               self.predict_ms("exact", n)) or (1 << 21)
        return t1, max(t1, t2)

    def fastest(self, length: int, variants=CALIBRATED_VARIANTS) -> str:
        return min(variants, key=lambda v: self.predict_ms(v, length))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cache_file() -> str:
    directory = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "attnopt")
    return os.path.join(directory, "calibration.json")


def _cache_key(device: str, dtype, heads: int, head_dim: int, causal: bool) -> str:
    import torch
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") \
        else "cpu"
    return f"{name}|{str(dtype).replace('torch.', '')}|h{heads}|d{head_dim}|" \
        f"{'causal' if causal else 'full'}|torch {torch.__version__}"


def calibrate(device: str = "cpu", dtype=None, *, heads: int = 4, head_dim: int = 64,
              causal: bool = False, lengths=None, runs: int = 3,
              use_cache: bool = True) -> Calibration:
    """Time the calibrated variants on `device` (cached per device, dtype, shape and torch
    version in $ATTNOPT_CACHE_DIR or ~/.cache/attnopt/calibration.json)."""
    import json

    import torch

    from attnopt.timing import median_ms
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    key = _cache_key(device, dtype, heads, head_dim, causal)
    path = _cache_file()
    cache = {}
    if use_cache and os.path.exists(path):
        try:
            with open(path) as handle:
                cache = json.load(handle)
        except (OSError, ValueError):
            cache = {}
        if key in cache and lengths is None:
            return Calibration(**cache[key])
    lengths = list(lengths or CALIBRATION_LENGTHS["cuda" if device.startswith("cuda")
                                                  else "cpu"])
    times: dict[str, list[float]] = {v: [] for v in CALIBRATED_VARIANTS}
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator)
                   .to(device=device, dtype=dtype) for _ in range(3))
        for variant in CALIBRATED_VARIANTS:
            call = _variant_call(variant, q, k, v, causal)
            if device.startswith("cuda"):
                def timed(call=call):
                    call()
                    torch.cuda.synchronize()
            else:
                timed = call
            with torch.no_grad():
                times[variant].append(median_ms(timed, runs))
    calibration = Calibration(key.split("|")[0], str(dtype).replace("torch.", ""), heads,
                              head_dim, causal, torch.__version__, lengths, times)
    if use_cache:
        cache[key] = calibration.to_dict()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as handle:
            json.dump(cache, handle, indent=1)
        os.replace(temporary, path)
    return calibration
