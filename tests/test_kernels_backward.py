"""The flash-attention backward kernels (dq, dk, dv) against autograd through the dense
reference in float64, one case per specialization of `attnopt.kernels.flash_backward`.

Without CUDA the kernels run on Triton's interpreter (float32/float16 only, so no bfloat16
case here); the interpreter must be chosen before Triton decorates the kernels, hence the
environment variable ahead of the attnopt imports.
"""

import os
import zlib
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnopt.kernels.flash import flash_attention, flash_forward  # noqa: E402
from attnopt.kernels.flash_backward import flash_backward  # noqa: E402
from attnopt.kernels.layout import BlockSparseLayout  # noqa: E402
from attnopt.kernels.params import AttentionParams  # noqa: E402
from attnopt.kernels.reference import flash_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |kernel grad - float64 grad| allowed, relative to the largest float64 grad of the tensor
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}


@dataclass
class Case:
    """One specialization: shapes (B, H, Hkv, Sq, Sk, D), dtype, and the keyword arguments of
    `flash_attention`, built from a seeded generator by `extra` where they hold tensors."""
    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    q_len: int = 64
    kv_len: int = 64
    head_dim: int = 32
    dtype: torch.dtype = torch.float32
    kwargs: dict = field(default_factory=dict)
    extra: Callable[["Case", torch.Generator], dict] = lambda case, gen: {}


def _additive_bias(case, gen):  # (1, 1, Sq, Sk): broadcast over batch and heads
    return dict(attn_bias=torch.randn(1, 1, case.q_len, case.kv_len, generator=gen))


def _boolean_bias(case, gen):
    allowed = torch.rand(case.batch, case.heads, case.q_len, case.kv_len, generator=gen) < 0.7
    allowed[:, :, 5] = False  # a row that sees no key: zero output, zero gradients
    return dict(attn_bias=allowed)


def _alibi(case, gen):
    return dict(alibi_slopes=torch.rand(case.heads, generator=gen) * 0.5)


def _kv_lengths(case, gen):  # the second row skips whole key blocks
    return dict(kv_lengths=torch.tensor([case.kv_len - 7, 20], dtype=torch.int32))


def _layout(block_size):
    def build(case, gen):
        shape = (1, case.heads, -(-case.q_len // block_size), -(-case.kv_len // block_size))
        blocks = torch.rand(shape, generator=gen) < 0.6
        blocks |= torch.eye(shape[-2], shape[-1], dtype=torch.bool)  # the diagonal is on
        blocks[..., 0, :] = False  # a query block that visits nothing
        return dict(block_mask=BlockSparseLayout(blocks, block_size))
    return build


CASES = {
    "plain": Case(),
    "causal_top_left": Case(kwargs=dict(causal=True)),
    "causal_bottom_right_short_queries": Case(
        q_len=48, kv_len=96, kwargs=dict(causal=True, causal_alignment="bottom_right")),
    "causal_bottom_right_long_queries": Case(  # the first 48 queries see no key
        q_len=96, kv_len=48, kwargs=dict(causal=True, causal_alignment="bottom_right")),
    "window_narrow": Case(kv_len=96, kwargs=dict(window=(20, 9))),  # no tile fully inside
    "window_wide": Case(kv_len=96, kwargs=dict(window=(45, 40))),
    "window_causal": Case(q_len=96, kv_len=96, kwargs=dict(window=(70, 4), causal=True)),
    "kv_lengths": Case(batch=2, q_len=40, kv_len=96, extra=_kv_lengths),
    "additive_bias": Case(batch=2, extra=_additive_bias),
    "boolean_bias": Case(extra=_boolean_bias),
    "alibi_causal": Case(kwargs=dict(causal=True), extra=_alibi),
    # keys right of the diagonal: the distance in full, not its causal linear form
    "alibi_window": Case(kv_len=96, kwargs=dict(window=(30, 12)), extra=_alibi),
    "alibi_causal_bottom_right": Case(q_len=40, kv_len=96, extra=_alibi, kwargs=dict(
        causal=True, causal_alignment="bottom_right")),
    "softcap_scale": Case(kwargs=dict(softcap=4.0, scale=0.4)),
    "gqa_group_2": Case(heads=4, kv_heads=2, kwargs=dict(causal=True)),
    "mqa": Case(heads=4, kv_heads=1, q_len=40, kv_len=72),
    "head_dim_40": Case(head_dim=40, q_len=50, kv_len=70, kwargs=dict(causal=True)),
    "layout": Case(q_len=96, kv_len=128, extra=_layout(32)),
    "layout_causal": Case(q_len=128, kv_len=128, kwargs=dict(causal=True), extra=_layout(64)),
    "float16_causal": Case(dtype=torch.float16, q_len=64, kv_len=80,
                           kwargs=dict(causal=True, causal_alignment="bottom_right")),
    # a float32 bias on half-precision q (MPT's padded ALiBi): added in float32 by the kernels
    "float16_float32_bias": Case(dtype=torch.float16, batch=2, extra=_additive_bias),
}


def _inputs(case: Case, name: str):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, case.dtype)

    q = draw(case.batch, case.heads, case.q_len, case.head_dim)
    k = draw(case.batch, case.kv_heads, case.kv_len, case.head_dim)
    v = draw(case.batch, case.kv_heads, case.kv_len, case.head_dim)
    grad_out = draw(case.batch, case.heads, case.q_len, case.head_dim)
    kwargs = dict(case.kwargs)
    for key, value in case.extra(case, gen).items():
        kwargs[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    return q, k, v, grad_out, kwargs


def _reference_grads(q, k, v, grad_out, kwargs):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = flash_attention_reference(*leaves, **kwargs)
    out.backward(grad_out.double())
    return [t.grad for t in leaves]


def _assert_grads_close(actual, expected, dtype, names=("dq", "dk", "dv")):
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape and got.dtype == dtype, \
            f"{name}: {got.dtype} {tuple(got.shape)}, expected {dtype} {tuple(want.shape)}"
        magnitude = want.abs().max().clamp_min(1.0)
        error = (got.double() - want).abs().max()
        assert error <= GRAD_TOLERANCE[dtype] * magnitude, \
            f"{name}: max abs error {error:.3e} over tolerance " \
            f"{GRAD_TOLERANCE[dtype]:.0e} x {magnitude:.3e}"


@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name):
    case = CASES[name]
    q, k, v, grad_out, kwargs = _inputs(case, name)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention(*leaves, **kwargs).backward(grad_out)
    _assert_grads_close([t.grad for t in leaves], _reference_grads(q, k, v, grad_out, kwargs),
                        case.dtype)


def test_lengths_compiled_in_first_then_read_at_run_time(monkeypatch):
    """The first lengths the kernels see under a key are compiled in as constants; other
    lengths run the compile that reads them at run time, and the first ones keep their own.
    Both compiles match the float64 gradients (lengths unequal and off the block size, so that
    swapped or ignored constants would show)."""
    from attnopt.kernels import tuning
    monkeypatch.setattr(tuning, "_static", {})
    monkeypatch.delenv(tuning.STATIC_LENGTHS_ENV, raising=False)
    compiled_in = []
    original = tuning._run

    def run(fn, cache_key, grid, args, kwargs, options):
        compiled_in.append((fn.__name__, kwargs.get("STATIC_SEQ_Q"), kwargs.get("STATIC_SEQ_K")))
        return original(fn, cache_key, grid, args, kwargs, options)
    monkeypatch.setattr(tuning, "_run", run)
    kernels = ("_flash_forward_kernel", "_backward_kernel")
    for q_len, kv_len, expected in ((50, 70, (50, 70)), (40, 90, (0, 0)), (50, 70, (50, 70))):
        case = Case(q_len=q_len, kv_len=kv_len, kwargs=dict(causal=True,
                                                            causal_alignment="bottom_right"))
        q, k, v, grad_out, kwargs = _inputs(case, f"static_{q_len}")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        compiled_in.clear()
        flash_attention(*leaves, **kwargs).backward(grad_out)
        assert [entry for entry in compiled_in if entry[0] in kernels] == \
            [(name, *expected) for name in kernels]
        _assert_grads_close([t.grad for t in leaves],
                            _reference_grads(q, k, v, grad_out, kwargs), case.dtype)


def test_broadcast_grad_out_and_fresh_outputs():
    # out.sum().backward() hands the kernel a stride-0 gradient; the results are new tensors
    case = CASES["gqa_group_2"]
    q, k, v, _, kwargs = _inputs(case, "broadcast_grad_out")
    grad_out = torch.ones(1, device=DEVICE, dtype=case.dtype).expand_as(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention(*leaves, **kwargs).sum().backward()
    _assert_grads_close([t.grad for t in leaves], _reference_grads(q, k, v, grad_out, kwargs),
                        case.dtype)

    params = AttentionParams.build(q, k, v, causal=True, scale=None, attn_bias=None,
                                   kv_lengths=None, window=None, block_mask=None, softcap=None,
                                   alibi_slopes=None, causal_alignment="top_left")
    out, lse = flash_forward(q, k, v, params)
    grads = flash_backward(grad_out, q, k, v, out, lse, params)
    inputs = (q, k, v, out, lse, grad_out)
    assert not any(g.data_ptr() == t.data_ptr() for g in grads for t in inputs)
    _assert_grads_close(grads, _reference_grads(q, k, v, grad_out, kwargs), case.dtype)


def test_bias_that_needs_a_gradient_gets_one():
    """The kernels give no bias gradient, so a bias that requires one takes the reference."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 16, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 16, 16, device=DEVICE, requires_grad=True)
    flash_attention(q, k, v, attn_bias=bias).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the canonical op's CUDA kernel")
@pytest.mark.parametrize("name", ["causal", "alibi_gqa_window", "float_mask", "mask_grad"])
def test_canonical_op_backward_reuses_its_kernel_forward(name, monkeypatch):
    """Through `torch.ops.attnopt.attention` (as a rewritten model is fine-tuned), the forward
    keeps its log-sum-exp and the backward runs the backward kernels alone: one forward kernel
    launch per forward + backward, gradients as autograd through the op's reference (float32).
    A float mask that needs a gradient runs the reference both ways (no kernel launch)."""
    import attnopt.kernels.flash as flash
    from attnopt.ops import common
    from attnopt.ops.attention import attention_reference
    monkeypatch.setenv("ATTNOPT_KERNELS", "always")
    launches = []
    original = flash.flash_forward
    monkeypatch.setattr(flash, "flash_forward",
                        lambda *args, **kwargs: launches.append(1) or original(*args, **kwargs))
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
    kv_heads = 2 if name == "alibi_gqa_window" else 4

    def draw(*shape, grad=True):
        return torch.randn(*shape, device="cuda", generator=gen,
                           dtype=torch.bfloat16).requires_grad_(grad)
    q = draw(2, 4, 128, 64)
    k, v = draw(2, kv_heads, 128, 64), draw(2, kv_heads, 128, 64)
    args = {"causal": (None, True),
            "alibi_gqa_window": (None, True, None, True, None, 40,
                                 torch.rand(4, device="cuda", generator=gen)),
            "float_mask": (draw(2, 1, 128, 128, grad=False),),
            "mask_grad": (draw(2, 1, 128, 128),)}[name]
    out = torch.ops.attnopt.attention(q, k, v, *args)
    grad = torch.randn(out.shape, device="cuda", generator=gen, dtype=out.dtype)
    inputs = (q, k, v) + ((args[0],) if name == "mask_grad" else ())
    grads = torch.autograd.grad(out, inputs, grad)
    assert len(launches) == (0 if name == "mask_grad" else 1)
    assert not common._KEPT  # taken by the backward's setup
    with torch.no_grad():  # no backward to take it: it goes with the output
        torch.ops.attnopt.attention(q, k, v, *args)
    assert not common._KEPT
    floats = [t.detach().float().requires_grad_() for t in (q, k, v)]
    rest = [a.detach().float().requires_grad_() if isinstance(a, torch.Tensor) and
            a.requires_grad else a for a in args]
    expected = attention_reference(*floats, *rest)
    wrt = floats + ([rest[0]] if name == "mask_grad" else [])
    expected_grads = torch.autograd.grad(expected, wrt, grad.float())
    assert (out.float() - expected).abs().max().item() <= 3e-2
    for got, want in zip(grads, expected_grads):
        assert (got.float() - want).abs().max().item() <= 3e-2 * max(1.0, want.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA backends")
@pytest.mark.parametrize("name", ["causal_gqa", "padded_causal", "bias_grad"])
def test_canonical_op_backward_reuses_its_sdpa_forward(name, monkeypatch):
    """Where the default mode sends a call to SDPA, forward + backward runs SDPA's forward once
    (its backward on what the fused backend saved), gradients as autograd through the op's
    reference in float32."""
    import sys
    from attnopt.ops import common
    op_module = sys.modules["attnopt.ops.attention"]  # (the package's `attention` is the op)
    monkeypatch.setenv("ATTNOPT_KERNELS", "auto")
    reference = op_module.attention_reference
    calls = []
    monkeypatch.setattr(op_module, "attention_reference",
                        lambda *args: calls.append(1) or reference(*args))
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
    kv_heads = 2 if name == "causal_gqa" else 4

    def draw(*shape, grad=True, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen,
                           dtype=dtype).requires_grad_(grad)
    q = draw(2, 4, 256, 64)
    k, v = draw(2, kv_heads, 256, 64), draw(2, kv_heads, 256, 64)
    padded = torch.ones(2, 1, 1, 256, dtype=torch.bool, device="cuda")
    padded[0, ..., -37:] = False  # (right: cuDNN differs on rows that see no key)
    args = {"causal_gqa": (None, True, None, True),
            "padded_causal": (padded, True),
            "bias_grad": (draw(2, 1, 256, 256),)}[name]
    out = torch.ops.attnopt.attention(q, k, v, *args)
    grad = torch.randn(out.shape, device="cuda", generator=gen, dtype=out.dtype)
    inputs = (q, k, v) + ((args[0],) if name == "bias_grad" else ())
    grads = torch.autograd.grad(out, inputs, grad)
    assert len(calls) == 1 and not common._KEPT
    floats = [t.detach().float().requires_grad_() for t in inputs]
    rest = (floats[3],) if name == "bias_grad" else args
    expected = reference(*floats[:3], *rest)
    expected_grads = torch.autograd.grad(expected, floats, grad.float())
    assert (out.float() - expected).abs().max().item() <= 3e-2
    for got, want in zip(grads, expected_grads):
        assert (got.float() - want).abs().max().item() <= 3e-2 * max(1.0, want.abs().max())
