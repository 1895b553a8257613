"""The generated flash-attention forward kernel against the float64 dense reference.

Without a GPU these run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so sizes
stay small: at most 128 positions, interpreter tiles of 32. Every case draws fresh random inputs
and the kernel writes into freshly allocated (uninitialized) outputs.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.kernels import BlockSparseLayout, flash_attention, flash_attention_reference
from attnopt.kernels.params import unsupported_reason

#: max |kernel - float64 reference| allowed, per input dtype (values are O(1): unit normal v)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed, batch=2, heads=4, kv_heads=2, q_len=70, kv_len=90, head_dim=40,
            dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)
    return (draw(batch, heads, q_len, head_dim), draw(batch, kv_heads, kv_len, head_dim),
            draw(batch, kv_heads, kv_len, head_dim))


def _check(q, k, v, **options):
    out = flash_attention(q, k, v, **options)
    reference = flash_attention_reference(q.double(), k.double(), v.double(), **options)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    error = (out.double() - reference).abs().max().item()
    assert error <= TOLERANCE[q.dtype], f"{options}: max error {error:.2e}"


def _layout(seed, shape, density=0.5):
    generator = torch.Generator().manual_seed(seed)
    return BlockSparseLayout(torch.rand(*shape, generator=generator) < density, 32)


def _padded_bias_heads_innermost(q_len=70, kv_len=90):
    """T5's bias layout: (B, H, Sq, Sk) over (B, Sq, Sk, H) memory, so the head stride is 1;
    the first row's last keys padded with float32's minimum."""
    bias = torch.randn(2, q_len, kv_len, 4)
    bias[0, :, kv_len - 7:] = torch.finfo(torch.float32).min
    return bias.permute(0, 3, 1, 2)


CASES = {
    "plain": {},
    "causal_top_left": dict(causal=True),
    "causal_bottom_right": dict(causal=True, causal_alignment="bottom_right"),
    "window": dict(window=(10, 5)),
    "causal_window_bottom_right": dict(causal=True, window=(17, 0),
                                       causal_alignment="bottom_right"),
    "kv_lengths": dict(kv_lengths=torch.tensor([50, 90], dtype=torch.int32)),
    "additive_bias_over_heads": dict(attn_bias=torch.randn(2, 1, 70, 90)),
    "additive_bias_heads_innermost": dict(attn_bias=_padded_bias_heads_innermost()),
    "boolean_bias": dict(attn_bias=torch.rand(70, 90) > 0.3),
    "softcap_and_scale": dict(softcap=5.0, scale=0.3),
    "alibi": dict(alibi_slopes=torch.rand(4)),
    "alibi_per_batch_causal": dict(alibi_slopes=torch.rand(2, 4), causal=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference(name):
    options = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
               for key, value in CASES[name].items()}
    _check(*_inputs(sum(map(ord, name))), **options)


def test_forward_bias_heads_innermost_at_t5_shape():
    """T5's encoder call (40 x 40, head dim 32, fp32, bias heads-innermost): with the lengths
    compiled in, triton 3.6 computed it wrong on an H100 (max error 1.2), so calls with a bias
    tensor read them at run time (`AttentionParams.static_lengths`)."""
    q, k, v = _inputs(7, heads=4, kv_heads=4, q_len=40, kv_len=40, head_dim=32)
    _check(q, k, v, attn_bias=_padded_bias_heads_innermost(40, 40).to(DEVICE))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (4, 1, 32), (2, 2, 96)])
def test_forward_head_layouts(heads, kv_heads, head_dim):
    q, k, v = _inputs(heads * 100 + head_dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      q_len=64, kv_len=64)
    _check(q, k, v, causal=True)


def test_forward_fp16():
    _check(*_inputs(7, dtype=torch.float16), causal=True, attn_bias=torch.randn(70, 90,
                                                                                device=DEVICE))


@pytest.mark.parametrize("causal", [False, True])
def test_forward_block_layout(causal):
    q, k, v = _inputs(11, q_len=64, kv_len=128, head_dim=64)
    layout = _layout(3, (2, 1, 2, 4))
    _check(q, k, v, block_mask=layout, causal=causal, causal_alignment="bottom_right")


def test_forward_rows_without_keys_are_zero():
    q, k, v = _inputs(5, q_len=32, kv_len=64)
    lengths = torch.tensor([0, 64], dtype=torch.int32, device=DEVICE)
    out = flash_attention(q, k, v, kv_lengths=lengths)
    assert (out[0] == 0).all()
    _check(q, k, v, kv_lengths=lengths)


def test_forward_float_min_mask_averages_like_pytorch():
    """A row masked with finfo.min everywhere averages v uniformly (as PyTorch's math path
    does with such masks), not NaN and not zeros."""
    q, k, v = _inputs(9, heads=2, kv_heads=2, q_len=32, kv_len=32)
    bias = torch.zeros(32, 32, device=DEVICE)
    bias[0] = torch.finfo(torch.float32).min
    out = flash_attention(q, k, v, attn_bias=bias)
    uniform = v.double().mean(dim=-2)
    assert (out[:, :, 0].double() - uniform).abs().max().item() <= TOLERANCE[torch.float32]
    _check(q, k, v, attn_bias=bias)


def test_forward_reads_strided_inputs():
    """BSHD tensors viewed as BHSD (a transpose, as models produce) need no copy to be right."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in _inputs(13, q_len=64, kv_len=64, kv_heads=4))
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("bad,message", [
    (dict(window=(-1, 3)), "window bounds"),
    (dict(window=3), "window must be"),
    (dict(kv_lengths=torch.tensor([1.0, 2.0])), "kv_lengths"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
    (dict(attn_bias=torch.zeros(5, 7)), "does not broadcast"),
    (dict(causal=True, causal_alignment="middle"), "causal_alignment"),
    (dict(softcap=0.0), "softcap"),
    (dict(block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool)), "BlockSparseLayout"),
])
def test_bad_arguments_raise(bad, message):
    q, k, v = _inputs(1, q_len=8, kv_len=8)
    bad = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
           for key, value in bad.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention(q, k, v, **bad)


def test_layout_shape_is_checked():
    q, k, v = _inputs(1, q_len=64, kv_len=64)
    with pytest.raises(ValueError, match="does not fit"):
        flash_attention(q, k, v, block_mask=BlockSparseLayout(
            torch.ones(1, 1, 3, 2, dtype=torch.bool), 32))


def test_layout_from_mask_covers_the_mask():
    mask = torch.rand(1, 2, 70, 90) < 0.02
    layout = BlockSparseLayout.from_mask(mask, 32)
    assert layout.blocks_BHMN.shape == (1, 2, 3, 3)
    assert (layout.dense_mask(70, 90) | ~mask).all()


def test_unsupported_reasons_are_named():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, device=DEVICE)
    assert "dtype" in unsupported_reason(q, q, q)
    q = torch.randn(1, 1, 4, 512, device=DEVICE)
    assert "head dim" in unsupported_reason(q, q, q)


def _fake_cuda(*shape, dtype=torch.float16):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda", dtype=dtype)


def test_backend_choice_by_mode(monkeypatch):
    """auto: the kernel only where SDPA has no fused kernel (soft-cap, sliding windows, long
    masked calls marked causal); always / never force."""
    from attnopt.ops.attention import (
        KERNELS_ENV, MIN_CAUSAL_MASK_KERNEL_QUERIES, kernel_skip_reason,
    )
    q = _fake_cuda(2, 4, 16, 64)
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert "fused SDPA" in kernel_skip_reason(q, q, q)
    assert kernel_skip_reason(q, q, q, softcap=30.0) is None
    # a mask marked causal: the kernel from MIN_CAUSAL_MASK_KERNEL_QUERIES queries on
    mask = _fake_cuda(2, 1, 16, 16, dtype=torch.bool)
    assert "16 queries" in kernel_skip_reason(q, q, q, mask, is_causal=True)
    assert "fused SDPA" in kernel_skip_reason(q, q, q, mask)
    long_q = _fake_cuda(2, 4, MIN_CAUSAL_MASK_KERNEL_QUERIES, 64)
    long_mask = _fake_cuda(2, 1, MIN_CAUSAL_MASK_KERNEL_QUERIES, MIN_CAUSAL_MASK_KERNEL_QUERIES,
                           dtype=torch.bool)
    assert kernel_skip_reason(long_q, long_q, long_q, long_mask, is_causal=True) is None
    assert "fused SDPA" in kernel_skip_reason(long_q, long_q, long_q, long_mask)
    # a sliding window: SDPA could only read it as a dense mask, at any length
    assert kernel_skip_reason(q, q, q, is_causal=True, window_left=3) is None
    assert kernel_skip_reason(q, q, q, mask, is_causal=True, window_left=3) is None
    # a band as long as the call (a short call of a dynamic capture): plain causal, SDPA's
    assert "fused SDPA" in kernel_skip_reason(q, q, q, is_causal=True, window_left=15)
    # a float bias wider than q (MPT's float32 ALiBi, padded): SDPA has no fused kernel for it
    assert kernel_skip_reason(q, q, q, _fake_cuda(2, 4, 16, 16, dtype=torch.float32)) is None
    assert "fused SDPA" in kernel_skip_reason(q, q, q, _fake_cuda(2, 4, 16, 16, dtype=q.dtype))
    monkeypatch.setenv(KERNELS_ENV, "always")
    assert kernel_skip_reason(q, q, q) is None
    assert "dtype" in kernel_skip_reason(*(_fake_cuda(2, 4, 16, 64, dtype=torch.float64),) * 3)
    monkeypatch.setenv(KERNELS_ENV, "never")
    assert "disabled" in kernel_skip_reason(q, q, q, softcap=30.0)
    monkeypatch.setenv(KERNELS_ENV, "sometimes")
    with pytest.raises(ValueError, match="ATTNOPT_KERNELS"):
        kernel_skip_reason(q, q, q)
    cpu = torch.randn(2, 4, 16, 64)
    monkeypatch.setenv(KERNELS_ENV, "always")
    assert "cpu" in kernel_skip_reason(cpu, cpu, cpu)


def test_calls_without_a_graph_skip_autograd_and_match_calls_with_one():
    """Under no_grad (or with inputs that need no gradient) the forward runs without the
    autograd.Function; the output is the one a differentiable call returns."""
    q, k, v = _inputs(17, q_len=64, kv_len=64, head_dim=32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with_graph = flash_attention(*leaves, causal=True)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        without = flash_attention(*leaves, causal=True)
    assert without.grad_fn is None and not without.requires_grad
    assert torch.equal(without, with_graph.detach())
    assert torch.equal(flash_attention(q, k, v, causal=True), without)


def test_host_integer_helpers_match_triton():
    import triton

    from attnopt.kernels.params import cdiv, next_power_of_2
    for n in range(0, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (1, 16, 48, 64):
            assert cdiv(n, block) == triton.cdiv(n, block)


def test_repeated_launches_follow_alignment_and_divisibility():
    """Calls with one launch key but arguments Triton specializes differently: lengths in one
    power-of-two bucket with and without 16 | n, and operands 16-byte aligned or not (on CUDA
    the second launch of a key skips Triton's binding: `tuning._DirectLaunch`)."""
    for q_len in (64, 40, 64, 40):
        _check(*_inputs(31, q_len=q_len, kv_len=q_len, head_dim=32), causal=True)
    q, k, v = _inputs(32, q_len=48, kv_len=48, head_dim=32)
    storage = torch.empty(q.numel() + 1, device=DEVICE, dtype=q.dtype)
    shifted = storage[1:].view(q.shape)  # 4 bytes past an aligned address
    shifted.copy_(q)
    for q_ in (q, shifted, q, shifted):
        _check(q_, k, v)


def test_specialized_values_first_seen_per_key_and_the_switch_off(monkeypatch):
    """`tuning.launch`'s specialize: the first values under a key are compiled in, others
    read at run time (zeros), per key; ATTNOPT_STATIC_LENGTHS=0 compiles none in."""
    from attnopt.kernels import tuning
    monkeypatch.setattr(tuning, "_static", {})
    monkeypatch.delenv(tuning.STATIC_LENGTHS_ENV, raising=False)
    first, other = {"STATIC_SEQ_Q": 50, "STATIC_SEQ_K": 70}, {"STATIC_SEQ_Q": 40,
                                                             "STATIC_SEQ_K": 90}
    zeros = {"STATIC_SEQ_Q": 0, "STATIC_SEQ_K": 0}
    assert tuning._specialized(("a",), first) == first
    assert tuning._specialized(("a",), other) == zeros
    assert tuning._specialized(("a",), first) == first
    assert tuning._specialized(("b",), other) == other  # another key: its own first values
    monkeypatch.setenv(tuning.STATIC_LENGTHS_ENV, "0")
    assert tuning._specialized(("c",), first) == zeros
    assert ("c",) not in tuning._static


def test_launch_properties_separate_what_triton_specializes():
    from attnopt.kernels.tuning import _properties
    aligned = torch.empty(8)
    shifted = torch.empty(9)[1:]
    base = [aligned, 32, 1.5]
    variants = [[shifted, 32, 1.5], [aligned, 33, 1.5], [aligned, 1, 1.5],
                [aligned, 2 ** 31, 1.5], [aligned.half(), 32, 1.5]]
    keys = {_properties(values, [0, 1, 2]) for values in [base] + variants}
    assert len(keys) == 1 + len(variants)
    assert _properties([aligned, 32, 2.5], [0, 1, 2]) == _properties(base, [0, 1, 2])
    assert _properties([object()], [0]) is None


def test_direct_launch_keeps_a_kernel_per_device_and_argument_properties(monkeypatch):
    """The plumbing of `_DirectLaunch` (on CUDA after a kernel's first launch): arguments in
    the kernel's parameter order with the config's values, the grid from the constexprs, and no
    kept kernel used on another device or for other argument properties."""
    from attnopt.kernels.tuning import _DirectLaunch
    launched = []

    class Compiled:  # stands in for Triton's CompiledKernel
        def __getitem__(self, grid):
            return lambda *values: launched.append((grid, values))

    direct = _DirectLaunch(names=["x", "n", "scale", "BLOCK"], positional=2, runtime=[0, 1, 2],
                           fixed={"BLOCK": 32, "num_warps": 4}, meta={"BLOCK": 32})
    x = torch.empty(64)
    device = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    grid = lambda meta: (64 // meta["BLOCK"], 3)  # noqa: E731
    assert not direct.launch(grid, (x, 64), {"scale": 0.5})
    direct.keep(Compiled(), (x, 64), {"scale": 0.5})
    assert direct.launch(grid, (x, 64), {"scale": 0.25})  # floats are not specialized
    assert launched == [((2, 3, 1), (x, 64, 0.25, 32))]
    assert not direct.launch(grid, (x, 63), {"scale": 0.5})  # 16 no longer divides n
    device[0] = 1
    assert not direct.launch(grid, (x, 64), {"scale": 0.5})  # loaded on device 0 only


def test_direct_launch_finds_repeat_values_without_working_out_properties(monkeypatch):
    """`_DirectLaunch.find`: values seen before are looked up by value (`_ValueKey`, types
    included: 64 and 64.0 are equal keys otherwise), new ones through `_properties` and
    remembered; a tensor's place holding something else falls back to `_properties`."""
    from attnopt.kernels import tuning

    class Compiled:
        def __getitem__(self, grid):
            return lambda *values: None

    worked_out = []
    properties = tuning._properties
    monkeypatch.setattr(tuning, "_properties",
                        lambda values, runtime: worked_out.append(1) or properties(values,
                                                                                   runtime))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    direct = tuning._DirectLaunch(names=["x", "n", "scale", "BLOCK"], positional=2,
                                  runtime=[0, 1, 2], fixed={"BLOCK": 32}, meta={"BLOCK": 32})
    x, y = torch.empty(64), torch.empty(64)
    direct.keep(Compiled(), (x, 64), {"scale": 0.5})
    direct.keep(Compiled(), (x, x), {"scale": 0.5})  # (a tensor where n was: kept, by
    assert direct.launch((1, ), (x, x), {"scale": 0.5})  # properties, never by value)
    assert not any(isinstance(part, torch.Tensor) for key in direct.by_value
                   for part in key[1][0])
    worked_out.clear()
    assert direct.launch((1, ), (x, 64), {"scale": 0.5}) and len(worked_out) == 1
    assert direct.launch((1, ), (y, 64), {"scale": 0.5}) and len(worked_out) == 1  # by value
    assert direct.launch((1, ), (x, 80), {"scale": 0.25}) and len(worked_out) == 2  # new values
    assert direct.launch((1, ), (x, 80), {"scale": 0.25}) and len(worked_out) == 2
    assert not direct.launch((1, ), (x, 65), {"scale": 0.5})  # 16 no longer divides n
    assert not direct.launch((1, ), (x.half(), 64), {"scale": 0.5})  # another dtype
    assert not direct.launch((1, ), (x, 64.0), {"scale": 0.5})  # a float where an int was
    assert not direct.launch((1, ), (x, True), {"scale": 0.5})
    assert not direct.launch((1, ), (None, 64), {"scale": 0.5})  # a tensor's place: None
    assert not direct.launch((1, ), (object(), 64), {"scale": 0.5})
    monkeypatch.setattr(tuning._DirectLaunch, "REMEMBERED", 2)
    for n in (96, 112, 128):
        assert direct.launch((1, ), (x, n), {"scale": 0.5})
    assert len(direct.by_value) <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (4.8 GB bias)")
def test_per_head_bias_with_offsets_past_2_31():
    """A (1, 9, 16K, 16K) bias: head 8 starts 2**31 elements in, where 32-bit offsets wrap
    (an illegal access before the kernels' batch and head offsets went 64-bit). Head 8's
    output against SDPA on its own slice."""
    heads, seq = 9, 16384
    generator = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(1, heads, seq, 32, device="cuda", dtype=torch.bfloat16,
                           generator=generator) for _ in range(3))
    bias = torch.randn(1, heads, seq, seq, device="cuda", dtype=torch.bfloat16,
                       generator=generator)
    assert 8 * bias.stride(1) >= 2 ** 31
    out = flash_attention(q, k, v, causal=True, attn_bias=bias)
    last = slice(heads - 1, heads)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, last].float(), k[:, last].float(), v[:, last].float(),
        attn_mask=bias[:, last].float().masked_fill(
            torch.ones(seq, seq, device="cuda", dtype=torch.bool).triu(1), float("-inf")))
    assert (out[:, last].float() - expected).abs().max().item() <= 2e-2
