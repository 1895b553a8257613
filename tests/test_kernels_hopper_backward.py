"""The warp-specialized Hopper backward (`attnopt/kernels/flash_hopper_backward.py`).

On a Hopper GPU, dq, dk and dv are checked against the float64 reference for each supported
spec: head dims 64 and 128, fp16 and bf16, no mask and both causal alignments (keys no query
sees included), GQA, lengths that are not tile multiples, (B, S, H, D) views, a custom scale,
ALiBi slopes per head and per batch row, causal windows narrower and wider than a key block,
a broadcast output gradient (stride 0, as `out.sum().backward()` gives), and a query at an
address TMA cannot take. Elsewhere (CI) the
tests check which calls route here and that the kernel compiles for sm_90 with the installed
Triton within the shared memory an H100 has; the specs it takes are the forward kernel's
(`test_kernels_hopper.py` checks them).
"""

from __future__ import annotations

import pytest
import torch

from attnopt.kernels import flash_attention, flash_attention_reference

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper",
                    reason="needs Gluon (Triton >= 3.5)")
from attnopt.kernels import flash_hopper_backward as hopper_backward  # noqa: E402
from test_kernels_hopper import GPU_CASES as FORWARD_CASES  # noqa: E402
from test_kernels_hopper import GRAD_TOLERANCE, _inputs, _on_gpu, _params, \
    check_compiles_for_sm90, check_register_split, count_calls, needs_hopper, \
    no_min_length  # noqa: E402

def test_scope_is_the_forward_kernels():
    """The backward takes the calls the forward kernel computes (`flash_hopper.scope_reason`,
    whose accepted and refused specs `test_kernels_hopper.py` checks), at the same head dims."""
    from attnopt.kernels import flash_hopper
    assert hopper_backward.scope_reason is flash_hopper.scope_reason
    assert set(hopper_backward.CONFIGS) == set(flash_hopper.CONFIGS)


def test_short_sequences_stay_on_the_triton_backward():
    for (head_dim, causal), shortest in hopper_backward.MIN_LENGTH.items():
        q, k, v = _inputs(3, head_dim=head_dim, q_len=shortest, kv_len=shortest, device="cpu")
        assert hopper_backward.speed_reason(_params(q, k, v, causal=causal)) is None
        q, k, v = _inputs(3, head_dim=head_dim, q_len=shortest, kv_len=shortest // 2,
                          device="cpu")
        reason = hopper_backward.speed_reason(_params(q, k, v, causal=causal,
                                                       causal_alignment="bottom_right"))
        assert "shorter" in reason
    q, k, v = _inputs(3, head_dim=128, q_len=4096, kv_len=4096, device="cpu")
    assert hopper_backward.speed_reason(_params(q, k, v, causal=True, window=(2047, 0))) is None
    reason = hopper_backward.speed_reason(_params(q, k, v, causal=True, window=(1023, 0)))
    assert "band" in reason


def test_causal_alibi_stays_on_the_triton_backward(monkeypatch):
    q, k, v = _inputs(3, head_dim=128, q_len=4096, kv_len=4096, device="cpu")
    slopes = torch.rand(4)
    assert hopper_backward.speed_reason(_params(q, k, v, alibi_slopes=slopes)) is None
    causal = _params(q, k, v, causal=True, alibi_slopes=slopes)
    assert "ALiBi" in hopper_backward.speed_reason(causal)
    monkeypatch.setattr(hopper_backward, "CAUSAL_ALIBI", True)
    assert hopper_backward.speed_reason(causal) is None


def test_off_cuda_and_switched_off(monkeypatch):
    q, k, v = _inputs(2, device="cpu")
    assert "CUDA" in hopper_backward.hopper_backward_reason(_params(q, k, v), q)
    monkeypatch.setenv(hopper_backward.ENV, "0")
    assert hopper_backward.ENV in hopper_backward.hopper_backward_reason(_params(q, k, v), q)


_COMPILE_SCRIPT = """
from attnopt.kernels import flash_hopper_backward as hb
stats = f"tensordesc<fp32[1, 64],{hb._STATS_LAYOUT!r}>"
for head_dim, config in sorted(hb.CONFIGS.items()):
    for causal in (False, True):
        tile, keys = descriptor(64, head_dim), descriptor(64 * config.consumers, head_dim)
        signature = {"q_desc": tile, "k_desc": keys, "v_desc": tile, "do_desc": tile,
                     "dk_desc": tile, "dv_desc": tile, "lse_desc": stats, "delta_desc": stats,
                     "dq_ptr": "*fp32", "slopes_ptr": "*fp32", "stride_sb": "i32",
                     "stride_sh": "i32", "heads": "i32", "kv_heads": "i32", "group": "i32",
                     "seq_q": "i32", "offset": "i32", "window_left": "i32", "qk_scale": "fp32",
                     "scale": "fp32"}
        maxnreg, consumer_regs = config.registers()
        constants = dict(HEAD_DIM=head_dim, STAGES=config.stages, CONSUMERS=config.consumers,
                         CAUSAL=causal, HAS_WINDOW=causal, HAS_ALIBI=causal,
                         CONSUMER_REGS=consumer_regs)
        results[f"{head_dim}-{causal}"] = compile_sm90(hb._hopper_backward_kernel, signature,
                                                       constants, maxnreg)
"""


def test_compiles_for_sm90():
    """The kernel builds for sm_90 (each head dim's config, plain and causal with a window and
    ALiBi) within an H100's shared memory; the GPU tests run it under the GPU machine's
    Triton."""
    check_compiles_for_sm90(_COMPILE_SCRIPT, list(hopper_backward.CONFIGS.values()))


def test_register_split_fits_the_register_file():
    """The producer and writer warps share the last warpgroup's PRODUCER_REGS."""
    check_register_split(list(hopper_backward.CONFIGS.values()))


# --------------------------------------------------------------------------- numerics (GPU)

#: the forward's cases, and a few that walk more query tiles per key block
GPU_CASES = dict(
    FORWARD_CASES,
    gqa_causal_64=(dict(heads=8, kv_heads=2, q_len=300, kv_len=300), dict(causal=True)),
    long_causal_128=(dict(head_dim=128, q_len=1100, kv_len=1100), dict(causal=True)),
    # a band wider than a key block
    window_long_64=(dict(q_len=1100, kv_len=1100), dict(causal=True, window=(300, 0))))


@pytest.fixture
def routed(monkeypatch):
    """The params of the backward calls that run on the Hopper kernel."""
    return count_calls(monkeypatch, hopper_backward, "hopper_backward", 6)


@pytest.fixture
def spy(routed, monkeypatch):
    """`routed`, with the small test shapes and causal ALiBi running on the Hopper kernel too."""
    no_min_length(monkeypatch, hopper_backward)
    monkeypatch.setattr(hopper_backward, "CAUSAL_ALIBI", True)
    return routed


def _check_gradients(name, q, k, v, grad, options):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    flash_attention_reference(q64, k64, v64, **options).backward(grad.double())
    for got, want, label in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"),
                             (v.grad, v64.grad, "dv")):
        assert got.shape == want.shape and torch.isfinite(got).all(), f"{name} {label}"
        error = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert error <= GRAD_TOLERANCE[q.dtype], f"{name} {label}: relative error {error:.2e}"


@needs_hopper
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gradients_match_reference(name, spy):
    shape, options = _on_gpu(GPU_CASES[name])
    q, k, v = (t.detach().requires_grad_() for t in _inputs(sum(map(ord, name)), **shape))
    grad = torch.randn_like(q)
    for t in (q, k, v):  # poisoned: every gradient entry must be written
        t.grad = None
    flash_attention(q, k, v, **options).backward(grad)
    assert len(spy) == 1
    _check_gradients(name, q, k, v, grad, options)


@needs_hopper
def test_broadcast_output_gradient(spy):
    """`out.sum().backward()` hands the backward a stride-0 gradient, which TMA cannot read:
    it is copied first."""
    q, k, v = (t.detach().requires_grad_() for t in _inputs(11, head_dim=128, q_len=200,
                                                             kv_len=200))
    flash_attention(q, k, v, causal=True).sum().backward()
    assert len(spy) == 1
    _check_gradients("sum", q, k, v, torch.ones_like(q), dict(causal=True))


@needs_hopper
def test_misaligned_query(spy):
    """q 2 bytes past an aligned address, contiguous: the forward runs the Triton kernel (TMA
    cannot address q), and this backward takes an aligned copy (`tma_operand`)."""
    q, k, v = _inputs(13, head_dim=128, q_len=200, kv_len=200)
    storage = torch.empty(q.numel() + 8, device="cuda", dtype=q.dtype)
    shifted = storage[1:q.numel() + 1].view(q.shape)
    shifted.copy_(q)
    shifted.requires_grad_()
    k, v = (t.detach().requires_grad_() for t in (k, v))
    grad = torch.randn_like(q)
    flash_attention(shifted, k, v, causal=True).backward(grad)
    assert len(spy) == 1
    _check_gradients("misaligned", shifted, k, v, grad, dict(causal=True))


@needs_hopper
def test_unsupported_specs_run_the_triton_backward(spy):
    q, k, v = (t.detach().requires_grad_() for t in _inputs(12))
    bias = torch.randn(256, 256, device="cuda", dtype=q.dtype)
    grad = torch.randn_like(q)
    flash_attention(q, k, v, attn_bias=bias).backward(grad)
    assert spy == []
    _check_gradients("bias", q, k, v, grad, dict(attn_bias=bias))


@needs_hopper
@pytest.mark.parametrize("head_dim, causal", sorted(hopper_backward.MIN_LENGTH))
def test_long_calls_route_by_default(head_dim, causal, routed):
    """At MIN_LENGTH with the shipped configs (no test override), the backward runs here."""
    length = hopper_backward.MIN_LENGTH[head_dim, causal]
    q, k, v = (t.detach().requires_grad_() for t in _inputs(head_dim, heads=2, kv_heads=2,
                                                             q_len=length, kv_len=length,
                                                             head_dim=head_dim))
    grad = torch.randn_like(q)
    flash_attention(q, k, v, causal=causal).backward(grad)
    assert len(routed) == 1
    _check_gradients("default", q, k, v, grad, dict(causal=causal))
