"""The approximate attention ops against float64 references of their own definitions.

Each op is checked (1) against a dense float64 evaluation of the same math — the chunked,
gathered and combined forms must compute exactly what the definition says — and (2) on the
limits where it must become exact attention. How close an approximation is to softmax
attention on a model is the guard's business (tests/test_guard.py), not asserted here beyond
the limits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnopt  # noqa: F401  (registers the ops)
from attnopt.ops.features import draw_projection, favor_features, relu_features
from attnopt.ops.hybrid import performer_window_kernel, performer_window_reference
from attnopt.ops.linear import linear_attention_reference
from attnopt.ops.performer import performer_reference
from attnopt.ops.sparse import (
    sparse_attention_kernel, sparse_attention_reference,
)
from attnopt.ops.sparsity import SparsePattern, pattern_layout, token_keep
from attnopt.ops.topk import select_blocks, topk_attention_kernel, topk_attention_reference

#: |op - float64 definition| in float64: only summation order differs.
DEFINITION_TOL = 1e-10
#: |op in float32 - float64 definition| (kernel paths under the interpreter, float32 inputs).
FLOAT32_TOL = 2e-5


def _qkv(seed, batch=2, heads=4, kv_heads=2, q_len=150, kv_len=None, dim=16,
         dtype=torch.float64, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    kv_len = kv_len or q_len

    def draw(*shape):
        return (torch.randn(*shape, generator=generator) * spread).to(dtype)
    return (draw(batch, heads, q_len, dim), draw(batch, kv_heads, kv_len, dim),
            draw(batch, kv_heads, kv_len, dim))


def _padding_mask(batch, kv_len, padded, dtype=torch.float64):
    mask = torch.zeros(batch, 1, 1, kv_len, dtype=dtype)
    mask[0, ..., kv_len - padded:] = torch.finfo(dtype).min
    return mask


def _repeat(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _kernel_attention(phi_q, phi_k, v, causal):
    """Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j), as an explicit (n × n) matrix."""
    weights = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        weights = weights.tril()
    return (weights @ v) / weights.sum(-1, keepdim=True)


def _masked_softmax_attention(q, k, v, keep, mask=None, scale=None):
    scores = q @ _repeat(k, q.shape[1]).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ _repeat(v, q.shape[1])


# ------------------------------------------------------------------------ Performer / linear


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_matches_its_definition(causal, kernel):
    q, k, v = _qkv(0)
    projection = draw_projection(48, 16, seed=3)
    out = performer_reference(q, k, v, projection, is_causal=causal, kernel=kernel, chunk=32)
    k_all, v_all = _repeat(k, 4), _repeat(v, 4)
    if kernel == "softmax":
        phi_q, _ = favor_features(q, projection, 16 ** -0.5, is_query=True)
        phi_k, _ = favor_features(k_all, projection, 16 ** -0.5, is_query=False)
    else:
        phi_q = relu_features(q, projection, 16 ** -0.5)
        phi_k = relu_features(k_all, projection, 16 ** -0.5)
    expected = _kernel_attention(phi_q, phi_k, v_all, causal)
    assert (out - expected).abs().max() < DEFINITION_TOL


def test_performer_estimates_softmax_attention_where_it_is_diffuse():
    """FAVOR+ error shrinks with the feature count (diffuse attention: small q·k)."""
    q, k, v = _qkv(1, spread=0.4)
    exact = F.scaled_dot_product_attention(q, _repeat(k, 4), _repeat(v, 4))
    errors = [(performer_reference(q, k, v, draw_projection(m, 16, seed=0)) - exact).abs()
              .max().item() for m in (16, 1024)]
    assert errors[1] < errors[0] and errors[1] < 0.05


def test_masked_keys_contribute_nothing():
    q, k, v = _qkv(2)
    mask = _padding_mask(2, 150, padded=20)
    projection = draw_projection(32, 16, seed=1)
    v_changed = v.clone()
    v_changed[0, :, -20:] += 100.0
    for op in (lambda vv: performer_reference(q, k, vv, projection, mask, True),
               lambda vv: linear_attention_reference(q, k, vv, mask, False),
               lambda vv: performer_window_reference(q, k, vv, projection, mask, False,
                                                     window=10, block=16)):
        assert (op(v) - op(v_changed)).abs().max() < DEFINITION_TOL


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_its_definition(causal):
    q, k, v = _qkv(3)
    out = linear_attention_reference(q, k, v, is_causal=causal, chunk=16)
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    expected = _kernel_attention(phi(q), phi(_repeat(k, 4)), _repeat(v, 4), causal)
    assert (out - expected).abs().max() < DEFINITION_TOL


def test_projection_is_reproducible_and_orthogonal_in_blocks():
    a, b = draw_projection(40, 16, seed=7), draw_projection(40, 16, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, draw_projection(40, 16, seed=8))
    block = a[:16] / a[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)


# ---------------------------------------------------------------------------------- sparse

PATTERNS = {
    "window": SparsePattern.sliding_window(20, 20, block=16),
    "causal_window": SparsePattern.sliding_window(20, 0, block=16),
    "dilated": SparsePattern.dilated(2, 2, block=16),
    "strided": SparsePattern.strided(3, block=16),
    "longformer": SparsePattern.longformer(1, 1, block=16),
    "bigbird": SparsePattern.bigbird(1, 1, 2, seed=3, block=16),
    "random": SparsePattern(block=16, random_blocks=2, seed=5),
    "local_and_window": SparsePattern(block=32, local_left=1, local_right=0, window_left=40),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_sparse_attention_matches_dense_masked_attention(name, causal):
    pattern = PATTERNS[name]
    q, k, v = _qkv(4)
    mask = _padding_mask(2, 150, padded=13)
    out = sparse_attention_reference(q, k, v, mask, causal, None, True, **pattern.to_dict())
    keep = token_keep(pattern, 150, 150, causal=causal)
    expected = _masked_softmax_attention(q, k, v, keep, mask)
    assert (out - expected).abs().max() < DEFINITION_TOL


def test_chunked_gathers_give_the_same_result(monkeypatch):
    """One query block per gather (the memory bound at its tightest), with a mask that differs
    per query row: the chunks' row offsets line up with the mask's and the causal positions."""
    import attnopt.ops.blocked as blocked
    q, k, v = _qkv(14)
    mask = torch.randn(2, 1, 150, 150, dtype=torch.float64)
    pattern = SparsePattern.bigbird(1, 1, 1, block=16)
    expected = _masked_softmax_attention(q, k, v, token_keep(pattern, 150, 150, causal=True),
                                         mask)
    monkeypatch.setattr(blocked, "GATHER_BUDGET", 1)
    out = sparse_attention_reference(q, k, v, mask, True, None, True, **pattern.to_dict())
    assert (out - expected).abs().max() < DEFINITION_TOL


def test_sparse_attention_with_unequal_lengths_and_bool_mask():
    q, k, v = _qkv(5, q_len=40, kv_len=150)
    bool_mask = torch.rand(40, 150, generator=torch.Generator().manual_seed(0)) > 0.2
    pattern = SparsePattern.bigbird(1, 1, 1, block=16)
    out = sparse_attention_reference(q, k, v, bool_mask, False, 0.3, True, **pattern.to_dict())
    keep = token_keep(pattern, 40, 150, causal=False) & bool_mask
    assert (out - _masked_softmax_attention(q, k, v, keep, scale=0.3)).abs().max() \
        < DEFINITION_TOL


def test_random_blocks_are_reproducible_and_seeded():
    a = pattern_layout(SparsePattern(block=16, random_blocks=3, seed=1), 512, 512, causal=False)
    b = pattern_layout(SparsePattern(block=16, random_blocks=3, seed=1), 512, 512, causal=False)
    c = pattern_layout(SparsePattern(block=16, random_blocks=3, seed=2), 512, 512, causal=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    causal = pattern_layout(SparsePattern(block=16, random_blocks=3), 512, 512, causal=True)
    assert not causal.triu(1).any()


def test_sparse_pattern_rejects_bad_blocks():
    with pytest.raises(ValueError, match="power of two"):
        SparsePattern(block=24)


def test_a_window_as_wide_as_the_sequence_runs_dense_sdpa(monkeypatch):
    """A sliding window no shorter than the sequence is dense attention: SDPA runs it, not the
    block-gathering path; a narrower window, or one with a mask, keeps its own path."""
    import attnopt.ops.sparse as sparse

    def blocked(*args, **kwargs):
        raise AssertionError("blocked path taken")
    monkeypatch.setattr(sparse, "blocked_attention", blocked)
    q, k, v = _qkv(21, q_len=100, dim=16)
    op = torch.ops.attnopt.sparse_attention
    for causal, (left, right) in ((True, (99, 0)), (False, (128, 128)), (False, (99, -1))):
        wide = SparsePattern.sliding_window(left, right, 64).to_dict().values()
        out = op(q, k, v, None, causal, None, True, *wide)
        expected = F.scaled_dot_product_attention(q, _repeat(k, 4), _repeat(v, 4),
                                                  is_causal=causal)
        assert (out - expected).abs().max() < 1e-12
    narrow = SparsePattern.sliding_window(98, 0, 64).to_dict().values()
    with pytest.raises(AssertionError, match="blocked path"):
        op(q, k, v, None, True, None, True, *narrow)
    wide = SparsePattern.sliding_window(99, 0, 64).to_dict().values()
    with pytest.raises(AssertionError, match="blocked path"):
        op(q, k, v, _padding_mask(2, 100, padded=5), True, None, True, *wide)


def test_windowed_sparse_work_grows_linearly():
    """The gathered form holds O(n·w) scores: each query block gathers a fixed number of key
    blocks however long the sequence is."""
    from attnopt.ops.blocked import BlockGather
    pattern = SparsePattern.sliding_window(64, 64, block=64)
    slots = [BlockGather(pattern_layout(pattern, n, n, causal=False), 64, n, n).slots
             for n in (1024, 8192)]
    assert slots[0] == slots[1] == 3


# -------------------------------------------------------------------------- hybrid, top-k


def _dense_hybrid(q, k, v, projection, window, causal, block=16):
    heads, dim = q.shape[1], q.shape[-1]
    scale = dim ** -0.5
    phi_q, h_q = favor_features(q, projection, scale, is_query=True)
    phi_k, h_k = favor_features(k, projection, scale, is_query=False)
    approx = (phi_q @ _repeat(phi_k, heads).transpose(-1, -2)) * torch.exp(h_q + _repeat(h_k,
                                                                                          heads))
    exact = torch.exp(q @ _repeat(k, heads).transpose(-1, -2) * scale)
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    local = -(-window // block)
    distance = i // block - j // block
    inside = (distance <= local) & (distance >= (0 if causal else -local))
    weights = torch.where(inside, exact, approx)
    if causal:
        weights = weights * (j <= i)
    return (weights @ _repeat(v, heads)) / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 10, 40])
def test_hybrid_matches_its_derivation(window, causal):
    q, k, v = _qkv(6, spread=0.6)
    projection = draw_projection(32, 16, seed=2)
    out = performer_window_reference(q, k, v, projection, None, causal, None, True, window,
                                     16)
    expected = _dense_hybrid(q, k, v, projection, window, causal)
    assert (out - expected).abs().max() < 1e-9


@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_is_exact_when_the_window_covers_every_key(causal):
    q, k, v = _qkv(7)
    out = performer_window_reference(q, k, v, draw_projection(16, 16, seed=0), None, causal,
                                     None, True, 200, 16)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert (out - exact).abs().max() < DEFINITION_TOL


@pytest.mark.parametrize("causal", [False, True])
def test_topk_attends_exactly_inside_its_selected_blocks(causal):
    q, k, v = _qkv(8, q_len=200)
    out = topk_attention_reference(q, k, v, None, causal, None, True, 16, 3, 1)
    layout = select_blocks(q, k, block=16, top_k=3, local_blocks=1, causal=causal)
    assert int(layout.sum(-1).max()) <= 3 + 3
    assert layout.diagonal(dim1=-2, dim2=-1).all()
    keep = layout.repeat_interleave(16, -1).repeat_interleave(16, -2)[..., :200, :200]
    if causal:
        keep = keep & torch.ones(200, 200, dtype=torch.bool).tril()
        assert not layout.triu(1).any()
    assert (out - _masked_softmax_attention(q, k, v, keep)).abs().max() < DEFINITION_TOL


def test_topk_with_every_block_selected_is_exact():
    q, k, v = _qkv(9, q_len=64)
    out = topk_attention_reference(q, k, v, None, True, None, True, 16, 8, 1)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out - exact).abs().max() < DEFINITION_TOL


# ------------------------------------------------------------------- gradients, kernel paths


@pytest.mark.parametrize("op", ["performer", "linear", "sparse", "hybrid", "topk"])
def test_op_gradients_are_those_of_their_references(op):
    """The registered autograd (recomputation) gives the gradients plain autograd gives
    through the reference; a mask that needs no gradient gets none."""
    projection = draw_projection(16, 16, seed=0)
    calls = {
        "performer": (torch.ops.attnopt.performer, performer_reference,
                      lambda q, k, v, m: (q, k, v, projection, m, True, None, True, "softmax",
                                          16)),
        "linear": (torch.ops.attnopt.linear_attention, linear_attention_reference,
                   lambda q, k, v, m: (q, k, v, m, True, True, 16)),
        "sparse": (torch.ops.attnopt.sparse_attention, sparse_attention_reference,
                   lambda q, k, v, m: (q, k, v, m, True, None, True, 16, 1, 0, 1, 0, 1, 1, 0,
                                       -1, -1)),
        "hybrid": (torch.ops.attnopt.performer_window, performer_window_reference,
                   lambda q, k, v, m: (q, k, v, projection, m, False, None, True, 8, 16)),
        "topk": (torch.ops.attnopt.topk_attention, topk_attention_reference,
                 lambda q, k, v, m: (q, k, v, m, False, None, True, 16, 1, 0)),
    }
    custom, reference, arguments = calls[op]
    inputs = _qkv(10, q_len=64, spread=0.5)
    mask = _padding_mask(2, 64, padded=5)
    upstream = torch.randn(2, 4, 64, 16, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    grads = []
    for function in (custom, reference):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = function(*arguments(*leaves, mask))
        grads.append(torch.autograd.grad(out, leaves, upstream))
    for got, expected in zip(*grads):
        assert got.abs().max() > 0
        assert (got - expected).abs().max() < DEFINITION_TOL


def test_sparse_and_topk_kernel_paths_match_the_references():
    """The block-sparse flash kernel path (Triton interpreter without a GPU), float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in _qkv(11, batch=1, heads=2, kv_heads=1, q_len=128,
                                           dtype=torch.float32))
    mask = torch.zeros(1, 1, 1, 128, device=device)
    mask[..., -5:] = float("-inf")
    sparse_args = (q, k, v, mask, True, None, True, 32, 1, 0, 1, 0, 1, 1, 3, 50, -1)
    topk_args = (q, k, v, None, False, None, True, 32, 1, 1)
    for kernel, reference, args in ((sparse_attention_kernel, sparse_attention_reference,
                                     sparse_args),
                                    (topk_attention_kernel, topk_attention_reference,
                                     topk_args)):
        expected = reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
        assert (kernel(*args).double() - expected).abs().max() < FLOAT32_TOL


@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_kernel_path_matches_the_reference(causal):
    """performer_window with its window on the flash kernel's block-sparse path and the
    kernel's log-sum-exp (Triton interpreter without a GPU), float32: GQA, a padding mask, a
    length that is not a block multiple."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in _qkv(14, q_len=100, dim=32, dtype=torch.float32))
    mask = _padding_mask(2, 100, padded=7, dtype=torch.float32).to(device)
    projection = draw_projection(48, 32, seed=2).to(device)
    args = (q, k, v, projection, mask, causal, None, True, 32, 32)
    expected = performer_window_reference(*[a.double() if isinstance(a, torch.Tensor) else a
                                            for a in args])
    got = performer_window_kernel(*args)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert (got.double() - expected).abs().max() < FLOAT32_TOL


def test_half_inputs_are_computed_in_float32():
    q, k, v = _qkv(12, dtype=torch.float16, spread=0.5)
    projection = draw_projection(64, 16, seed=0)
    out = performer_reference(q, k, v, projection, is_causal=True)
    expected = performer_reference(q.double(), k.double(), v.double(), projection,
                                   is_causal=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 5e-3
    assert math.isfinite(float(expected.abs().max()))


# ----------------------------------------------------------------------------------- ONNX

MASK = object()  # stands for the mask input in ONNX_CASES


def _onnx_mask(kind, seed, length):
    """The site's mask for the ONNX cases: key padding (B, 1, 1, Sk) float, a boolean
    (B, 1, Sq, Sk) mask that depends on the query, or a per-head (1, H, Sq, Sk) float bias."""
    generator = torch.Generator().manual_seed(1000 + seed)
    if kind == "padding":
        return _padding_mask(2, length, padded=7, dtype=torch.float32)
    if kind == "full_bool":
        mask = torch.rand(2, 1, length, length, generator=generator) > 0.3
        return mask | torch.eye(length, dtype=torch.bool)
    return torch.randn(1, 4, length, length, generator=generator)  # "head_bias"


ONNX_CASES = {  # name: (op and its arguments after q, k, v, the mask kind)
    "performer_causal_masked": (lambda p: (torch.ops.attnopt.performer,
                                           (p, MASK, True, None, True, "softmax", 16)),
                                "padding"),
    "performer_relu": (lambda p: (torch.ops.attnopt.performer,
                                  (p, MASK, False, None, True, "relu", 16)), "padding"),
    "linear_causal": (lambda p: (torch.ops.attnopt.linear_attention, (MASK, True, True, 16)),
                      "padding"),
    "sparse_bigbird": (lambda p: (torch.ops.attnopt.sparse_attention,
                                  (MASK, False, None, True, 16, 1, 1, 1, 0, 1, 2, 3, -1, -1)),
                       "padding"),
    "sparse_strided_dilated_causal": (lambda p: (torch.ops.attnopt.sparse_attention,
                                                 (None, True, None, True, 16, 2, 2, 2, 3, 0, 0,
                                                  0, -1, -1)), "padding"),
    "sparse_window_full_bool_mask": (lambda p: (torch.ops.attnopt.sparse_attention,
                                                (MASK, False, None, True, 16, -1, -1, 1, 0, 0,
                                                 0, 0, 20, 9)), "full_bool"),
    "sparse_longformer_causal_head_bias": (lambda p: (torch.ops.attnopt.sparse_attention,
                                                      (MASK, True, 0.3, True, 16, 1, 1, 1, 0,
                                                       2, 0, 0, -1, -1)), "head_bias"),
    "hybrid_causal": (lambda p: (torch.ops.attnopt.performer_window,
                                 (p, MASK, True, None, True, 20, 16)), "padding"),
    "hybrid_full_bool_mask": (lambda p: (torch.ops.attnopt.performer_window,
                                         (p, MASK, False, None, True, 16, 16)), "full_bool"),
    "topk_causal": (lambda p: (torch.ops.attnopt.topk_attention,
                               (None, True, None, True, 16, 2, 1)), "padding"),
    "topk_masked": (lambda p: (torch.ops.attnopt.topk_attention,
                               (MASK, False, None, True, 16, 2, 1)), "padding"),
    "topk_head_bias": (lambda p: (torch.ops.attnopt.topk_attention,
                                  (MASK, False, None, True, 16, 1, 0)), "head_bias"),
}


@pytest.mark.parametrize("name", sorted(ONNX_CASES))
def test_ops_export_to_onnx_and_run_in_onnxruntime_at_other_lengths(name, tmp_path):
    """Every approximate op's ONNX form, in onnxruntime at lengths other than the export's
    (and not block multiples), against the op itself in float32."""
    import onnxruntime

    from attnopt.onnx_export import translation_table
    factory, mask_kind = ONNX_CASES[name]
    op, extra = factory(draw_projection(32, 16, seed=0))

    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("projection", extra[0] if isinstance(extra[0], torch.Tensor)
                                 else torch.zeros(1))

        def forward(self, q, k, v, mask):
            args = [self.projection if isinstance(a, torch.Tensor) else
                    (mask if a is MASK else a) for a in extra]
            return op(q, k, v, *args)

    def inputs(seed, length):
        q, k, v = _qkv(seed, q_len=length, dtype=torch.float32)
        return q, k, v, _onnx_mask(mask_kind, seed, length)

    length = torch.export.Dim("length", min=2, max=4096)
    mask_dims = {3: length} if mask_kind == "padding" else {2: length, 3: length}
    dims = {"q": {2: length}, "k": {2: length}, "v": {2: length}, "mask": mask_dims}
    path = str(tmp_path / f"{name}.onnx")
    model = Site()
    torch.onnx.export(model, inputs(0, 96), path, dynamo=True, opset_version=18,
                      custom_translation_table=translation_table(18), dynamic_shapes=dims,
                      input_names=["q", "k", "v", "mask"], verbose=False)
    session = onnxruntime.InferenceSession(path)
    for seed, n in ((1, 96), (2, 150)):
        feed = inputs(seed, n)
        (got,) = session.run(None, {key: t.numpy() for key, t in zip("q k v mask".split(),
                                                                      feed)})
        expected = model(*feed).numpy()
        assert abs(got - expected).max() < 2e-5
    if mask_kind == "padding":  # the O(n) structure survives export: nothing n × n inside
        shapes = _intermediate_shapes(path, dict(zip("q k v mask".split(), inputs(3, 150))))
        assert len(shapes) > 20
        assert not [s for s in shapes if sum(d >= 150 for d in s) >= 2]


def _intermediate_shapes(path, feed):
    """The shape of every value the ONNX graph computes on `feed` (each node output is made a
    graph output and onnxruntime runs the graph)."""
    import onnx
    import onnxruntime
    model = onnx.load(path)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in outputs and name in types:
                model.graph.output.append(onnx.helper.make_value_info(
                    name, onnx.helper.make_tensor_type_proto(types[name], None)))
    session = onnxruntime.InferenceSession(model.SerializeToString())
    values = session.run(None, {key: t.numpy() for key, t in feed.items()})
    return [v.shape for v in values if hasattr(v, "shape")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_causal_favor_kernels_match_the_reference(dtype):
    """favor_causal_attention (Triton interpreter without a GPU): block prefix states plus the
    own block's keys j <= i, against the chunked torch reference in float64 — GQA, a key
    mask, a head dim and feature count that are not powers of two, a length that is not a
    block multiple."""
    from attnopt.kernels.favor import favor_causal_attention, favor_skip_reason
    from attnopt.ops.features import keep_for_kv_heads, visible_keys_mask
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(15, batch=2, heads=4, kv_heads=2, q_len=150, dim=40, dtype=torch.float64,
                   spread=0.5)
    mask = _padding_mask(2, 150, padded=9)
    projection = draw_projection(96, 40, seed=5)
    expected = performer_reference(q, k, v, projection, mask, True)
    keep = keep_for_kv_heads(visible_keys_mask(mask.to(device), 150), 2)
    args = [t.to(device, dtype) for t in (q, k, v)]
    assert favor_skip_reason(*args, keep, True, "softmax") is None
    out = favor_causal_attention(*args, projection, 40 ** -0.5, keep)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert out.dtype == dtype
    assert (out.double().cpu() - expected).abs().max() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_linear_attention_kernels_match_the_reference(dtype, causal):
    """attnopt.kernels.linear (Triton interpreter without a GPU) against the torch reference in
    float64: GQA, a key mask, a head dim that is not a power of two, a length that is not a
    block multiple; causal through per-block prefix states plus the own block."""
    from attnopt.kernels.linear import linear_attention_fused, linear_skip_reason
    from attnopt.ops.features import keep_for_kv_heads, visible_keys_mask
    from attnopt.ops.performer import MIN_DENOMINATOR
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(17, batch=2, heads=4, kv_heads=2, q_len=150, dim=40, dtype=torch.float64,
                   spread=0.5)
    mask = _padding_mask(2, 150, padded=9)
    expected = linear_attention_reference(q, k, v, mask, causal)
    keep = keep_for_kv_heads(visible_keys_mask(mask.to(device), 150), 2)
    args = [t.to(device, dtype) for t in (q, k, v)]
    assert linear_skip_reason(*args, keep, causal) is None
    out = linear_attention_fused(*args, causal, keep, MIN_DENOMINATOR)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert out.dtype == dtype
    assert (out.double().cpu() - expected).abs().max() < tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_op_runs_the_fused_kernels_on_cuda(dtype, causal, monkeypatch):
    """The op on CUDA takes the fused kernels (counted), on BSHD-strided operands as models
    pass them, matches the float64 reference, and its gradient is the reference's."""
    import attnopt.kernels.linear as linear_kernels
    calls = []
    fused = linear_kernels.linear_attention_fused
    monkeypatch.setattr(linear_kernels, "linear_attention_fused",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    q, k, v = _qkv(19, batch=2, heads=4, kv_heads=2, q_len=300, dim=64, spread=0.5)
    mask = _padding_mask(2, 300, padded=20)
    expected = linear_attention_reference(q, k, v, mask, causal)
    args = [t.transpose(1, 2).contiguous().transpose(1, 2).to("cuda", dtype).requires_grad_()
            for t in (q, k, v)]
    out = torch.ops.attnopt.linear_attention(*args, mask.to("cuda"), causal, False)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert calls and out.dtype == dtype
    assert (out.double().cpu() - expected).abs().max() < tolerance
    out.float().square().sum().backward()
    reference_args = [t.detach().double().requires_grad_() for t in args]
    linear_attention_reference(*reference_args, mask.to("cuda").double(), causal) \
        .square().sum().backward()
    for got, want in zip(args, reference_args):
        assert (got.grad.double() - want.grad).abs().max() < 10 * tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_favor_kernels_match_the_reference(dtype):
    """attnopt.kernels.favor (Triton interpreter without a GPU): GQA, a key mask, a head dim
    and a feature count that are not powers of two, a length that is not a tile multiple."""
    from attnopt.kernels.favor import favor_attention, favor_skip_reason
    from attnopt.ops.features import keep_for_kv_heads, visible_keys_mask
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(13, batch=2, heads=4, kv_heads=2, q_len=100, dim=40, dtype=torch.float64,
                   spread=0.5)
    mask = _padding_mask(2, 100, padded=9)
    projection = draw_projection(96, 40, seed=4)
    expected = performer_reference(q, k, v, projection, mask)
    keep = keep_for_kv_heads(visible_keys_mask(mask.to(device), 100), 2)
    args = [t.to(device, dtype) for t in (q, k, v)]
    assert favor_skip_reason(*args, keep, False, "softmax") is None
    out = favor_attention(*args, projection, 40 ** -0.5, keep)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    assert out.dtype == dtype
    assert (out.double().cpu() - expected).abs().max() < tolerance
