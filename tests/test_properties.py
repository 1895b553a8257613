"""Property tests (hypothesis) for mask classification and for detecting and canonicalizing
hand-written attention.

1. `classify_mask` on generated masks (causal, sliding window, key padding, causal+padding,
   random bool, additive bias; bool or float 0/-inf/finfo.min) names the right kind and window.
   Expectations are stated from the mask's structure, degenerate cases included: a window as
   wide as the keys is causal, a one-query causal mask attends everything, a padding mask with
   every key valid is no mask, causal+padding whose padding never cuts inside the causal
   triangle is plain padding, ...
2. `optimize` on generated hand-written attention modules (GQA via repeat_interleave or
   expand+reshape, BHSD or BSHD inputs, matmul / einsum / bmm scores, four scale spellings, five
   mask spellings, three softmax spellings) finds exactly one site, rewrites it exactly,
   describes its shapes, and matches the module on fresh random inputs.
3. The same modules returning their probabilities are left alone, with the reason given.

Combinations that failed when these properties were first written are kept as explicit
regression cases at the end of the file.

optimize() costs 1-3 s per call (torch.export), so the module properties draw few examples.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import attnopt
from attnopt.ops import ATTENTION_OP
from attnopt.passes.masks import MaskInfo, classify_mask

MASK_SETTINGS = settings(max_examples=150, deadline=None)
# Each example of the module properties exports a model (1-3 s): few examples, and no shrinking
# (shrinking a failure takes many minutes; the failure message prints the whole config).
_SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
             phases=(Phase.explicit, Phase.reuse, Phase.generate))
MODULE_SETTINGS = settings(max_examples=15, **_SLOW)
NEGATIVE_SETTINGS = settings(max_examples=8, **_SLOW)

MAX_ABS_ERR = 1e-5


# ============================================================================================
# 1. classify_mask
# ============================================================================================
#
# Conventions (those of masks.py): bool masks are True = attend; float masks are added to the
# scores, values <= -1e4 (finfo.min, -inf) meaning "masked out"; causal is bottom-right
# aligned: query i may attend key j iff j <= i + kv_len - q_len.


def _grid(q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(q_len).unsqueeze(-1), torch.arange(kv_len)


def causal_allowed(q_len: int, kv_len: int) -> torch.Tensor:
    rows, cols = _grid(q_len, kv_len)
    return cols <= rows + (kv_len - q_len)


def window_allowed(q_len: int, kv_len: int, window: int) -> torch.Tensor:
    rows, cols = _grid(q_len, kv_len)
    offset = kv_len - q_len
    return (cols <= rows + offset) & (cols > rows + offset - window)


def key_padding_allowed(lengths: list[int], kv_len: int, left: bool = False) -> torch.Tensor:
    """(B, 1, 1, kv_len): the valid keys of each batch row (the first `len`, or the last)."""
    cols = torch.arange(kv_len)
    lens = torch.tensor(lengths).unsqueeze(-1)
    valid = cols >= kv_len - lens if left else cols < lens
    return valid[:, None, None, :]


def reference_kind(allowed: torch.Tensor, q_len: int, kv_len: int
                   ) -> tuple[str, Optional[int]]:
    """The kind a bool pattern has, from the definitions (windows tried by brute force).

    Checked in order of specificity: none, causal, window (some w < kv_len; w >= kv_len is
    causal), padding (every query of a batch/head row sees the same keys), causal+padding
    (causal & a per-row key set), else bool.
    """
    allowed = allowed.expand(*allowed.shape[:-2], q_len, kv_len)
    if bool(allowed.all()):
        return "none", None
    if bool((allowed == causal_allowed(q_len, kv_len)).all()):
        return "causal", None
    for window in range(1, kv_len):
        if bool((allowed == window_allowed(q_len, kv_len, window)).all()):
            return "window", window
    keys = allowed.any(-2, keepdim=True)
    if bool((allowed == keys).all()):
        return "padding", None
    if bool((allowed == (causal_allowed(q_len, kv_len) & keys)).all()):
        return "causal+padding", None
    return "bool", None


def promoted(kind: str, window: Optional[int], depends_on_input: bool
             ) -> tuple[str, Optional[int]]:
    """A mask computed from an integer input (attention_mask) is padding on top of its shape."""
    if depends_on_input and kind == "none":
        return "padding", None
    if depends_on_input and kind == "causal":
        return "causal+padding", None
    return kind, window


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: How a bool pattern is handed to classify_mask: as bool, or as a float 0 / fill mask.
representations = st.one_of(
    st.just(("bool", None, None)),
    st.tuples(st.just("float"), st.sampled_from(FLOAT_DTYPES), st.sampled_from(["-inf", "min"])),
)


def represent(allowed: torch.Tensor, representation) -> torch.Tensor:
    form, dtype, fill = representation
    if form == "bool":
        return allowed
    value = float("-inf") if fill == "-inf" else torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, value)


def check_classification(mask: torch.Tensor, *, q_len: int, kv_len: int,
                         structure: tuple[str, Optional[int]], depends_on_input: bool,
                         depends_on_data: bool) -> MaskInfo:
    """classify_mask(mask) against the expected structure (before input/data promotion)."""
    info = classify_mask(mask, is_causal=False, q_len=q_len, kv_len=kv_len,
                         depends_on_input=depends_on_input, depends_on_data=depends_on_data)
    if depends_on_data:
        # a mask computed from float data: a float one is an arbitrary bias, a bool one an
        # arbitrary pattern
        expected = ("bool" if mask.dtype == torch.bool else "additive", None)
    else:
        expected = promoted(*structure, depends_on_input)
    assert (info.kind, info.window) == expected, (
        f"classify_mask gave {info}, expected {expected}; q_len={q_len} kv_len={kv_len} "
        f"depends_on_input={depends_on_input} depends_on_data={depends_on_data}\n"
        f"mask={mask}")
    assert info.constant == (not (depends_on_input or depends_on_data))
    if info.kind == "window":
        assert info.window is not None and 1 <= info.window < kv_len
    return info


lengths_st = st.integers(1, 12)
flags = st.booleans()


@st.composite
def padding_lengths(draw, kv_len: int) -> list[int]:
    batch = draw(st.integers(1, 3))
    return draw(st.lists(st.integers(1, kv_len), min_size=batch, max_size=batch))


def as_shape(allowed2d: torch.Tensor, four_d: bool) -> torch.Tensor:
    return allowed2d[None, None] if four_d else allowed2d


@MASK_SETTINGS
@given(q_len=lengths_st, kv_len=lengths_st, four_d=flags, representation=representations,
       depends_on_input=flags, depends_on_data=flags)
def test_classify_causal(q_len, kv_len, four_d, representation, depends_on_input,
                         depends_on_data):
    allowed = causal_allowed(q_len, kv_len)
    # one query sees every key under bottom-right alignment: no mask at all
    structure = ("none", None) if q_len == 1 else ("causal", None)
    check_classification(represent(as_shape(allowed, four_d), representation), q_len=q_len,
                         kv_len=kv_len, structure=structure, depends_on_input=depends_on_input,
                         depends_on_data=depends_on_data)


@MASK_SETTINGS
@given(q_len=lengths_st, kv_len=lengths_st, window=lengths_st, four_d=flags,
       representation=representations, depends_on_input=flags)
def test_classify_sliding_window(q_len, kv_len, window, four_d, representation,
                                 depends_on_input):
    allowed = window_allowed(q_len, kv_len, window)
    if window >= kv_len:  # the window never cuts: plain causal
        structure = ("none", None) if q_len == 1 else ("causal", None)
    else:
        structure = ("window", window)
    check_classification(represent(as_shape(allowed, four_d), representation), q_len=q_len,
                         kv_len=kv_len, structure=structure, depends_on_input=depends_on_input,
                         depends_on_data=False)


@MASK_SETTINGS
@given(data=st.data(), q_len=lengths_st, kv_len=lengths_st, left=flags, materialize=flags,
       representation=representations, depends_on_input=flags)
def test_classify_key_padding(data, q_len, kv_len, left, materialize, representation,
                              depends_on_input):
    lengths = data.draw(padding_lengths(kv_len), label="lengths")
    allowed = key_padding_allowed(lengths, kv_len, left)  # (B, 1, 1, kv)
    if materialize:  # the (B, 1, q, kv) form Hugging Face builds
        allowed = allowed.expand(len(lengths), 1, q_len, kv_len).clone()
    if all(n == kv_len for n in lengths):
        structure = ("none", None)  # every key valid
    elif left and q_len == 1 and len(set(lengths)) == 1:
        # one query seeing the last n keys is also a sliding window of n (checked first)
        structure = ("window", lengths[0])
    else:
        structure = ("padding", None)
    check_classification(represent(allowed, representation), q_len=q_len, kv_len=kv_len,
                         structure=structure, depends_on_input=depends_on_input,
                         depends_on_data=False)


@MASK_SETTINGS
@given(data=st.data(), q_len=lengths_st, kv_len=lengths_st, representation=representations,
       depends_on_input=flags)
def test_classify_causal_padding(data, q_len, kv_len, representation, depends_on_input):
    lengths = data.draw(padding_lengths(kv_len), label="lengths")
    allowed = causal_allowed(q_len, kv_len) & key_padding_allowed(lengths, kv_len)
    offset = kv_len - q_len
    if all(n == kv_len for n in lengths):  # padding never cuts: plain causal
        structure = ("none", None) if q_len == 1 else ("causal", None)
    elif all(n <= offset + 1 for n in lengths):
        # causal never cuts inside the valid keys (every query already sees them all,
        # e.g. one query): the same keys for every query, i.e. plain padding
        structure = ("padding", None)
    else:
        structure = ("causal+padding", None)
    check_classification(represent(allowed, representation), q_len=q_len, kv_len=kv_len,
                         structure=structure, depends_on_input=depends_on_input,
                         depends_on_data=False)


@MASK_SETTINGS
@given(data=st.data(), q_len=lengths_st, kv_len=lengths_st, batch=st.integers(0, 2),
       representation=representations, depends_on_input=flags, depends_on_data=flags)
def test_classify_random_bool(data, q_len, kv_len, batch, representation, depends_on_input,
                              depends_on_data):
    shape = (q_len, kv_len) if batch == 0 else (batch, 1, q_len, kv_len)
    bits = data.draw(st.lists(flags, min_size=math.prod(shape), max_size=math.prod(shape)),
                     label="bits")
    allowed = torch.tensor(bits, dtype=torch.bool).reshape(shape)
    # every query attends at least one key (a fully masked row is not attention)
    keep = data.draw(st.lists(st.integers(0, kv_len - 1), min_size=math.prod(shape[:-1]),
                              max_size=math.prod(shape[:-1])), label="kept key per row")
    allowed.view(-1, kv_len)[torch.arange(len(keep)), torch.tensor(keep)] = True
    check_classification(represent(allowed, representation), q_len=q_len, kv_len=kv_len,
                         structure=reference_kind(allowed, q_len, kv_len),
                         depends_on_input=depends_on_input, depends_on_data=depends_on_data)


@MASK_SETTINGS
@given(data=st.data(), q_len=lengths_st, kv_len=lengths_st, batch=st.integers(0, 2),
       fill=st.sampled_from([None, "-inf", "min"]), depends_on_input=flags,
       depends_on_data=flags)
def test_classify_additive_bias(data, q_len, kv_len, batch, fill, depends_on_input,
                                depends_on_data):
    shape = (q_len, kv_len) if batch == 0 else (batch, 1, q_len, kv_len)
    values = data.draw(st.lists(st.one_of(st.just(0.0), st.floats(-8.0, 8.0, width=32)),
                                min_size=math.prod(shape), max_size=math.prod(shape)),
                       label="bias")
    bias = torch.tensor(values, dtype=torch.float32).reshape(shape)
    allowed = torch.ones(shape, dtype=torch.bool)
    if fill is not None:  # a bias on top of a causal pattern (ALiBi-style)
        allowed = causal_allowed(q_len, kv_len).expand(shape)
        bias = bias.masked_fill(~allowed, float("-inf") if fill == "-inf"
                                else torch.finfo(torch.float32).min)
    constant = not (depends_on_input or depends_on_data)
    alibi = constant and fill is not None and batch > 0 and q_len == kv_len and \
        key_position_slope(bias[..., 0, :, :], allowed[..., 0, :, :])
    if bool((bias[allowed] != 0).any()) and not alibi:
        structure = ("additive", None)
    else:  # an all-zero bias adds nothing, a key-position one is ALiBi: the masking counts
        structure = reference_kind(allowed, q_len, kv_len)
    info = check_classification(bias, q_len=q_len, kv_len=kv_len, structure=structure,
                                depends_on_input=depends_on_input,
                                depends_on_data=depends_on_data)
    if structure[0] == "additive":
        assert info.kind == "additive"
    assert (info.alibi_slopes is not None) == bool(alibi)


def key_position_slope(bias: torch.Tensor, allowed: torch.Tensor) -> bool:
    """Whether every batch row of the (B, Sq, Sk) `bias` is `s * j + c[i]` at the allowed
    positions with one nonzero slope `s` (least squares over s and the row constants, float64:
    the residual must vanish)."""
    positions = allowed[0].nonzero()
    if not any(int(allowed[0, i].sum()) > 1 for i in range(allowed.shape[-2])):
        return False  # no row with two keys: no slope to speak of
    design = torch.zeros(len(positions), 1 + allowed.shape[-2], dtype=torch.float64)
    design[:, 0] = positions[:, 1].double()
    design[torch.arange(len(positions)), 1 + positions[:, 0]] = 1.0
    target = bias[:, positions[:, 0], positions[:, 1]].double().T  # (allowed, B)
    solution = torch.linalg.lstsq(design, target).solution
    residual = (design @ solution - target).abs().max().item()
    slope = solution[0].abs().min().item()
    return residual <= 1e-5 * max(1.0, target.abs().max().item()) and slope > 0 and \
        bool(torch.allclose(solution[0], solution[0][:1].expand_as(solution[0]), rtol=1e-5))


@given(q_len=lengths_st, kv_len=lengths_st, is_causal=flags)
@settings(max_examples=20, deadline=None)
def test_classify_no_mask(q_len, kv_len, is_causal):
    info = classify_mask(None, is_causal=is_causal, q_len=q_len, kv_len=kv_len,
                         depends_on_input=False, depends_on_data=False)
    assert info == MaskInfo("causal" if is_causal else "none", constant=True)


# ============================================================================================
# 2. detection + canonicalization of hand-written attention
# ============================================================================================

GQA_FORMS = ("repeat_interleave", "expand")
SCORE_FORMS = ("matmul", "einsum", "bmm")
SCALE_FORMS = ("div", "mul", "pre_q", "sqrt_both")
MASK_FORMS = ("none", "bias", "bool_fill", "where_min", "causal")
SOFTMAX_FORMS = ("plain", "upcast", "dtype_f32")
INPUT_MASKS = ("bias", "bool_fill", "where_min")


class HandWrittenAttention(nn.Module):
    """One attention written as `cfg` says; head counts, head dim and scale are constants of
    the module (as model code keeps them), sequence lengths and batch come from the inputs.

    Inputs: q (B, H, Sq, D), k and v (B, Hkv, Sk, D) — (B, S, H, D) with layout BSHD — and for
    the input-mask forms a mask (Bm, 1, Sq, Sk): float bias, bool "masked", or bool "keep".

    With cfg["derived"] the scale and GQA group are computed from the input shapes instead
    (`q.shape[-1] ** -0.5`, `q.shape[1] // k.shape[1]`), as functional attention code does.
    """

    def __init__(self, cfg: dict, return_probs: bool = False):
        super().__init__()
        self.cfg = dict(cfg)
        self.heads, self.kv_heads, self.head_dim = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        self.group = self.heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        self.return_probs = return_probs

    def forward(self, q, k, v, mask=None):
        c = self.cfg
        h, hkv, g, d = self.heads, self.kv_heads, self.group, self.head_dim
        if c["layout"] == "BSHD":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
        scale = self.scale
        if c.get("derived"):
            scale, g = q.shape[-1] ** -0.5, q.shape[1] // k.shape[1]
        if c["gqa"] == "repeat_interleave":
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        elif c["gqa"] == "expand":  # Hugging Face repeat_kv
            k = k[:, :, None, :, :].expand(b, hkv, g, sk, d).reshape(b, h, sk, d)
            v = v[:, :, None, :, :].expand(b, hkv, g, sk, d).reshape(b, h, sk, d)
        if c["score"] == "bmm":
            q, k, v = q.reshape(b * h, sq, d), k.reshape(b * h, sk, d), v.reshape(b * h, sk, d)
        if c["scale"] == "pre_q":
            q = q * scale
        elif c["scale"] == "sqrt_both":
            root = math.sqrt(scale)
            q, k = q * root, k * root

        if c["score"] == "matmul":
            s = torch.matmul(q, k.transpose(-2, -1))
        elif c["score"] == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            s = torch.bmm(q, k.transpose(1, 2))
        if c["scale"] == "div":
            s = s / math.sqrt(d)
        elif c["scale"] == "mul":
            s = s * scale

        if c["mask"] in INPUT_MASKS and c["score"] == "bmm":  # the mask, not the scores, merged
            mask = mask.expand(b, h, sq, sk).reshape(b * h, sq, sk)
        if c["mask"] == "bias":
            s = s + mask
        elif c["mask"] == "bool_fill":
            s = s.masked_fill(mask, float("-inf"))
        elif c["mask"] == "where_min":
            s = torch.where(mask, s, torch.finfo(s.dtype).min)
        elif c["mask"] == "causal":
            # bottom-right aligned when there are at least as many keys as queries; top-left
            # otherwise, so that no query row is fully masked
            ones = torch.ones(sq, sk, device=s.device)
            tri = ones.tril(diagonal=sk - sq) if sk >= sq else ones.tril()
            s = s.masked_fill(tri == 0, float("-inf"))

        if c["softmax"] == "plain":
            p = torch.softmax(s, dim=-1)
        elif c["softmax"] == "upcast":
            p = s.float().softmax(dim=-1).to(q.dtype)
        else:
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)

        if c["score"] == "matmul":
            out = torch.matmul(p, v)
        elif c["score"] == "einsum":
            out = torch.einsum("bhqk,bhkd->bhqd", p, v)
        else:
            out = torch.bmm(p, v).reshape(b, h, sq, d)
        if c["layout"] == "BSHD":
            out = out.transpose(1, 2)
        return (out, p) if self.return_probs else out


@st.composite
def attention_configs(draw) -> dict:
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([n for n in range(1, heads + 1) if heads % n == 0]))
    batch = draw(st.integers(1, 2))
    mask = draw(st.sampled_from(MASK_FORMS))
    return {
        "batch": batch, "heads": heads, "kv_heads": kv_heads,
        "gqa": "none" if kv_heads == heads else draw(st.sampled_from(GQA_FORMS)),
        "q_len": draw(st.integers(1, 8)), "kv_len": draw(st.integers(1, 8)),
        "head_dim": draw(st.sampled_from([4, 8])),
        "layout": draw(st.sampled_from(["BHSD", "BSHD"])),
        "score": draw(st.sampled_from(SCORE_FORMS)),
        "scale": draw(st.sampled_from(SCALE_FORMS)),
        "mask": mask,
        "mask_batch": draw(st.sampled_from([1, batch])) if mask in INPUT_MASKS else 1,
        "softmax": draw(st.sampled_from(SOFTMAX_FORMS)),
        "derived": draw(st.booleans()),
    }


def make_inputs(cfg: dict, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    b, sq, sk, d = cfg["batch"], cfg["q_len"], cfg["kv_len"], cfg["head_dim"]

    def shaped(heads, seq):
        shape = (b, seq, heads, d) if cfg["layout"] == "BSHD" else (b, heads, seq, d)
        return torch.randn(shape, generator=gen)

    args = (shaped(cfg["heads"], sq), shaped(cfg["kv_heads"], sk), shaped(cfg["kv_heads"], sk))
    mask_shape = (cfg["mask_batch"], 1, sq, sk)
    if cfg["mask"] == "bias":
        args += (torch.randn(mask_shape, generator=gen),)
    elif cfg["mask"] in ("bool_fill", "where_min"):
        keep = torch.rand(mask_shape, generator=gen) < 0.6
        keep[..., 0] = True  # no query row fully masked
        args += (~keep if cfg["mask"] == "bool_fill" else keep,)
    return args


def expected_mask_kind(cfg: dict, args: tuple) -> tuple[str, Optional[int]]:
    sq, sk = cfg["q_len"], cfg["kv_len"]
    if cfg["mask"] == "none":
        return "none", None
    if cfg["mask"] == "bias":
        return "additive", None  # a float input is data: an arbitrary bias
    if cfg["mask"] == "causal":  # built from shapes only: a fact of the graph
        ones = torch.ones(sq, sk)
        tri = ones.tril(diagonal=sk - sq) if sk >= sq else ones.tril()
        return reference_kind(tri.bool(), sq, sk)
    keep = args[3] if cfg["mask"] == "where_min" else ~args[3]
    return promoted(*reference_kind(keep, sq, sk), depends_on_input=True)


def rewritten_graph(optimized) -> torch.fx.GraphModule:
    """The fx graph the OptimizedModule runs (whole-model capture)."""
    regions = optimized._attnopt_state.whole_regions
    assert len(regions) == 1, f"expected one installed whole-model region, got {len(regions)}"
    return regions[0].rewritten


def describe(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def check_rewritten(cfg: dict, seed: int) -> None:
    """The module property: one site, rewritten exactly, described right, same outputs."""
    module = HandWrittenAttention(cfg).eval()
    examples = make_inputs(cfg, seed)
    optimized = attnopt.optimize(module, "exact", example_inputs=examples)
    records = optimized.report.sites
    why = f"\n{describe(cfg)}\nreport:\n{optimized.report}"
    assert len(records) == 1, f"expected one site, got {len(records)}" + why
    record = records[0]
    assert record.rewrite == "exact", f"site not rewritten: {record.reason}" + why
    site = record.site
    assert site is not None

    b, h, hkv = cfg["batch"], cfg["heads"], cfg["kv_heads"]
    if cfg["score"] == "bmm":
        # documented in detect.py: (B·H, S, D) operands are lifted to (1, B·H, S, D); a GQA
        # repeat done before the merge is not seen through, so every merged row is a head
        assert (site.batch, site.heads, site.kv_heads, site.gqa_group) == (1, b * h, b * h, 1), \
            why
        assert site.layout == "merged batch·heads", why
    else:
        assert (site.batch, site.heads, site.kv_heads, site.gqa_group) == (b, h, hkv, h // hkv), \
            why
    assert (site.q_len, site.kv_len, site.head_dim, site.v_head_dim) == \
        (cfg["q_len"], cfg["kv_len"], cfg["head_dim"], cfg["head_dim"]), why
    assert site.form == cfg["score"], why
    # every scale spelling is absorbed into the op's scale
    assert site.scale == pytest.approx(cfg["head_dim"] ** -0.5, rel=1e-6), why
    if cfg["score"] != "bmm":
        assert site.layout == cfg["layout"], why
    assert (site.mask_kind, site.window) == expected_mask_kind(cfg, examples), why
    assert record.max_abs_err is not None and record.max_abs_err <= MAX_ABS_ERR, why

    graph = rewritten_graph(optimized).graph
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets.count(ATTENTION_OP) == 1, f"{why}\n{graph}"
    assert not any("softmax" in str(t) for t in targets), f"{why}\n{graph}"

    # fresh inputs of the same shapes, not the examples the rewrite was verified on
    fresh = make_inputs(cfg, seed + 1)
    with torch.no_grad():
        reference = module(*fresh)
        candidate = optimized(*fresh)
    assert candidate.shape == reference.shape
    err = float((candidate - reference).abs().max())
    assert err <= MAX_ABS_ERR, f"max abs err {err:.3e} on fresh inputs" + why


@MODULE_SETTINGS
@given(cfg=attention_configs(), seed=st.integers(0, 2**16))
def test_hand_written_attention_is_rewritten_exactly(cfg, seed):
    check_rewritten(cfg, seed)


# ============================================================================================
# 3. probabilities used elsewhere: not attention the canonical op can replace
# ============================================================================================


@NEGATIVE_SETTINGS
@given(cfg=attention_configs(), seed=st.integers(0, 2**16))
def test_returned_probabilities_block_the_rewrite(cfg, seed):
    module = HandWrittenAttention(cfg, return_probs=True).eval()
    optimized = attnopt.optimize(module, "exact", example_inputs=make_inputs(cfg, seed))
    records = optimized.report.sites
    why = f"\n{describe(cfg)}\nreport:\n{optimized.report}"
    assert records, "the softmax is not even reported as left alone" + why
    assert all(r.rewrite == "none" for r in records), why
    assert any("probabilities" in r.reason and "used outside" in r.reason for r in records), why
    fresh = make_inputs(cfg, seed + 1)
    with torch.no_grad():
        out, probs = optimized(*fresh)
        ref_out, ref_probs = module(*fresh)
    assert torch.equal(out, ref_out) and torch.equal(probs, ref_probs)


# ============================================================================================
# Regressions: combinations that failed when these properties were first written (attnopt
# fixed them since); kept as explicit cases so a regression names itself.
# ============================================================================================

_BASE = dict(batch=2, heads=4, kv_heads=4, gqa="none", q_len=3, kv_len=5, head_dim=8,
             layout="BHSD", score="matmul", scale="div", mask="none", mask_batch=1,
             softmax="plain")


@pytest.mark.parametrize("scale", ["pre_q", "sqrt_both"])
def test_einsum_prescaled_operands_scale_is_absorbed(scale):
    """Was: the einsum path of detect._match_softmax did not peel scalar scales off its
    operands, so `einsum('bhqd,bhkd->bhqk', q * c, k)` kept aten.mul(q, c) in the graph and
    reported site.scale == 1.0."""
    check_rewritten({**_BASE, "score": "einsum", "scale": scale}, seed=0)


def test_einsum_bshd_layout_is_reported():
    """Was: only the matmul/bmm path noted a transposed q as BSHD; einsum sites of (B, S, H, D)
    inputs were reported as BHSD."""
    check_rewritten({**_BASE, "score": "einsum", "layout": "BSHD"}, seed=0)


def test_scale_from_head_dim_of_input_is_absorbed():
    """Was: with the head dim captured dynamic, `scores * q.shape[-1] ** -0.5` exported as
    mul.Tensor(scores, pow(sym_float(sym_size(q, 3)), -0.5)); scalar_arg saw a node, and the
    site was rejected as 'scores multiplied by a tensor'."""
    check_rewritten({**_BASE, "scale": "mul", "derived": True}, seed=0)


def test_repeat_interleave_with_group_from_shapes_is_peeled():
    """Was: `k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)` exported with a SymInt
    repeats node (operator.floordiv of sym_sizes); _peel_head_repeat required an int, so the
    site reported kv_heads == heads and gqa_group 1."""
    check_rewritten({**_BASE, "kv_heads": 2, "gqa": "repeat_interleave", "derived": True},
                    seed=0)


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (2, 2), (3, 5)])
def test_fully_masked_mask_is_not_a_zero_window(q_len, kv_len):
    """Was: masks._structure took window = max attended keys per row = 0, and the zero-width
    window equals an all-False mask, so a mask attending nothing was a 'window' of 0."""
    info = classify_mask(torch.zeros(q_len, kv_len, dtype=torch.bool), is_causal=False,
                         q_len=q_len, kv_len=kv_len, depends_on_input=False,
                         depends_on_data=False)
    assert not (info.kind == "window" and not info.window), info
