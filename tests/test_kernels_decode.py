"""The split-KV decode kernels (`attnopt.kernels.decode`) against the dense reference in float64.

Without CUDA the kernels run under the Triton interpreter, which has no SMs to fill: it uses a
fixed small split count and 32-key tiles, so 300 keys spread over 3 splits of 4 tiles each and
every case crosses split and tile boundaries.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton kernels are defined

from attnopt.kernels import decode  # noqa: E402
from attnopt.kernels.flash import flash_attention  # noqa: E402
from attnopt.kernels.layout import BlockSparseLayout  # noqa: E402
from attnopt.kernels.params import AttentionParams  # noqa: E402
from attnopt.kernels.reference import flash_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_ATOL = 1e-5
FP16_ATOL = 3e-3
KV_LEN = 300             # not a multiple of any tile size
BLOCK_MARGIN = 2 * 128   # keys past this distance from the visible band are never loaded

ATTENTION_DEFAULTS = dict(causal=False, scale=None, attn_bias=None, kv_lengths=None,
                          window=None, block_mask=None, softcap=None, alibi_slopes=None,
                          causal_alignment="top_left")


def make_qkv(batch=2, heads=8, kv_heads=2, q_len=1, kv_len=KV_LEN, head_dim=64,
             dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))


def build_params(q, k, v, **options) -> AttentionParams:
    return AttentionParams.build(q, k, v, **{**ATTENTION_DEFAULTS, **options})


def reference(q, k, v, **options):
    return flash_attention_reference(q.double(), k.double(), v.double(), **options)


def check_decode(q, k, v, atol=FP32_ATOL, **options):
    out = decode.decode_attention(q, k, v, build_params(q, k, v, **options))
    expected = reference(q, k, v, **options)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    return out


def test_gqa_single_query_from_bshd_cache():
    q, k, v = make_qkv(q_len=1)
    # a KV cache stored (B, S, Hkv, D) and viewed as (B, Hkv, S, D): strided, not copied
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    check_decode(q, k, v)


def test_gqa_bottom_right_causal():
    q, k, v = make_qkv(q_len=5, seed=1)
    check_decode(q, k, v, causal=True, causal_alignment="bottom_right")


def test_mqa_bottom_right_causal():
    q, k, v = make_qkv(heads=4, kv_heads=1, q_len=5, seed=2)
    check_decode(q, k, v, causal=True, causal_alignment="bottom_right")


def test_group_wider_than_one_program(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PACKED_ROWS", 16)  # 8 heads x 5 queries: 3 programs
    q, k, v = make_qkv(batch=1, heads=8, kv_heads=1, q_len=5, seed=3)
    check_decode(q, k, v, causal=True, causal_alignment="bottom_right")


def test_kv_lengths_cut_inside_splits_and_empty_row(monkeypatch):
    monkeypatch.setattr(decode, "INTERPRETER_SPLITS", 4)
    q, k, v = make_qkv(batch=3, heads=4, kv_heads=2, q_len=5, seed=4)
    lengths = torch.tensor([KV_LEN, 75, 0], dtype=torch.int32, device=DEVICE)
    # keys far past a row's length are never read: poisoning them must not reach the output
    k[1, :, 75 + BLOCK_MARGIN:] = float("nan")
    v[1, :, 75 + BLOCK_MARGIN:] = float("nan")
    out = check_decode(q, k, v, kv_lengths=lengths, causal=True,
                       causal_alignment="bottom_right")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_window_skips_keys_outside_band():
    # query 0's first key (575) lies just below the 32-key tile where the last query's first
    # key lies, and its last key (605) in the tile below the end (610): the band must cover every
    # query, not the last one only
    kv_len, left = 610, 30
    q, k, v = make_qkv(q_len=5, kv_len=kv_len, seed=5)
    first_visible = kv_len - 5 - left
    assert first_visible > BLOCK_MARGIN
    k_clean, v_clean = k.clone(), v.clone()
    k[:, :, :first_visible - BLOCK_MARGIN] = float("nan")
    v[:, :, :first_visible - BLOCK_MARGIN] = float("nan")
    options = dict(window=(left, 0), causal_alignment="bottom_right")
    out = decode.decode_attention(q, k, v, build_params(q, k, v, **options))
    torch.testing.assert_close(out.double(), reference(q, k_clean, v_clean, **options),
                               atol=FP32_ATOL, rtol=0)


def test_additive_bias_per_head_and_query():
    q, k, v = make_qkv(q_len=5, seed=6)
    bias = torch.randn(2, 8, 5, KV_LEN, generator=torch.Generator().manual_seed(60))
    bias[0, 3, 4] = float("-inf")                     # a row masked out entirely: zeros
    bias[1, 6, 0] = torch.finfo(torch.float32).min    # masked the finite way: a uniform average
    out = check_decode(q, k, v, attn_bias=bias.to(DEVICE))
    assert torch.equal(out[0, 3, 4], torch.zeros_like(out[0, 3, 4]))


def test_boolean_bias_with_a_fully_masked_row():
    q, k, v = make_qkv(q_len=3, seed=7)
    allowed = torch.rand(2, 8, 3, KV_LEN, generator=torch.Generator().manual_seed(70)) > 0.3
    allowed[1, 5, 2] = False
    out = check_decode(q, k, v, attn_bias=allowed.to(DEVICE))
    assert torch.equal(out[1, 5, 2], torch.zeros_like(out[1, 5, 2]))


def test_alibi_slopes_per_batch_and_head():
    q, k, v = make_qkv(q_len=5, seed=8)
    slopes = torch.rand(2, 8, generator=torch.Generator().manual_seed(80)).to(DEVICE) * 0.1
    check_decode(q, k, v, alibi_slopes=slopes, causal=True, causal_alignment="bottom_right")


def test_softcap_scale_and_padded_head_dim():
    q, k, v = make_qkv(head_dim=40, seed=9)
    check_decode(q, k, v, softcap=5.0, scale=0.3)


def test_float16():
    q, k, v = make_qkv(q_len=4, dtype=torch.float16, seed=10)
    check_decode(q, k, v, atol=FP16_ATOL, causal=True, causal_alignment="bottom_right")


def test_single_split_writes_output_directly(monkeypatch):
    monkeypatch.setattr(decode, "INTERPRETER_SPLITS", 1)
    q, k, v = make_qkv(q_len=2, seed=11)
    lengths = torch.tensor([120, 0], dtype=torch.int32, device=DEVICE)
    out = check_decode(q, k, v, kv_lengths=lengths)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_reduction_combines_splits_over_several_steps(monkeypatch):
    """More splits than the reduction loads per step (some of them empty): the steps' partial
    sums add up to the dense result."""
    monkeypatch.setattr(decode, "split_count", lambda params, device: 9)
    monkeypatch.setattr(decode, "MAX_SPLIT_BLOCK", 4)
    q, k, v = make_qkv(q_len=2, seed=12)
    check_decode(q, k, v, causal=True, causal_alignment="bottom_right")


def test_flash_attention_routes_decode_shapes(monkeypatch):
    calls = []
    real_decode_forward = decode.decode_forward

    def counting_decode_forward(*args):
        calls.append(args[3])
        return real_decode_forward(*args)

    monkeypatch.setattr(decode, "decode_forward", counting_decode_forward)
    q, k, v = make_qkv(batch=1, heads=4, kv_heads=2, q_len=2, kv_len=decode.MIN_DECODE_KV_LEN,
                       seed=12)
    options = dict(causal=True, causal_alignment="bottom_right")
    out = flash_attention(q, k, v, **options)
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), reference(q, k, v, **options), atol=FP32_ATOL,
                               rtol=0)


def test_use_decode_kernel_rule():
    def params_for(q_len, kv_len, **options):
        q, k, v = (torch.empty(1, 4, s, 64) for s in (q_len, kv_len, kv_len))
        k, v = k[:, :2], v[:, :2]
        return build_params(q, k, v, **options)

    min_len = decode.MIN_DECODE_KV_LEN
    assert decode.use_decode_kernel(params_for(1, min_len))
    assert decode.use_decode_kernel(params_for(16, 4 * min_len, causal=True))
    assert not decode.use_decode_kernel(params_for(17, 4 * min_len))
    assert not decode.use_decode_kernel(params_for(1, min_len - 1))
    layout = BlockSparseLayout(torch.ones(1, 1, 1, min_len // 64, dtype=torch.bool), 64)
    assert not decode.use_decode_kernel(params_for(1, min_len, block_mask=layout))


def test_split_count_fills_the_gpu(monkeypatch):
    monkeypatch.setattr(decode, "interpreting", lambda: False)
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)

    def splits(batch, heads, kv_heads, kv_len, q_len=1, **options):
        q = torch.empty(batch, heads, q_len, 128)
        k = torch.empty(batch, kv_heads, kv_len, 128)
        return decode.split_count(build_params(q, k, k, **options), gpu)

    assert splits(1, 32, 8, 128 * 1024) == 33            # 8 programs per split: 264 wanted
    assert splits(1, 32, 1, 128 * 1024) == decode.MAX_SPLITS
    assert splits(64, 32, 8, 4096) == 1                  # the grid is full without splitting
    assert splits(1, 32, 8, 1024) == 1024 // decode.MIN_KEYS_PER_SPLIT
    assert splits(1, 32, 8, 128 * 1024, window=(4096, 0)) == 16
