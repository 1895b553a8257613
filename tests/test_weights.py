"""Weight rewrites: GQA conversion and head pruning, on every projection form we rebuild.

A rewrite that changes weights is lossy in general, so the numerics are checked on models
built to make it exact: k/v heads equal in pairs (pooling them loses nothing), out-projection
columns of some heads zero (removing them loses nothing). Then the rewritten model must match
the original to float32 round-off, the projections must really shrink, and the guard must keep
the rewrite. On random heads the guard must roll it back and the model must stay as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import Policy
from attnopt.errors import PolicyError
from attnopt.policy import Rule

E, H, S, B = 32, 4, 8, 2
D = E // H
#: float32 round-off of a few matmuls on unit-scale inputs.
EXACT_TOL = 1e-5


def gqa_policy(**params) -> Policy:
    return Policy("gqa-test", weights=[Rule("gqa", params=params)])


def prune_policy(**params) -> Policy:
    return Policy("prune-test", weights=[Rule("prune_heads", params=params)])


# --------------------------------------------------------------------------------------------
# one attention block per projection form


class SeparateProjections(nn.Module):
    """Hugging Face style: q/k/v/out linears, views to (B, S, H, D), SDPA, causal."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, E))

    def kv_rows(self):
        return [(self.k.weight, self.k.bias), (self.v.weight, self.v.bias)]

    def out_weight(self):
        return self.o.weight


class PackedPermuted(nn.Module):
    """timm ViT style: one qkv linear, reshape (B, S, 3, H, D), permute, unbind, matmuls."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, s, E))

    def kv_rows(self):
        return [(self.qkv.weight[E:2 * E], self.qkv.bias[E:2 * E]),
                (self.qkv.weight[2 * E:], self.qkv.bias[2 * E:])]

    def out_weight(self):
        return self.proj.weight


class PackedSplit(nn.Module):
    """nanoGPT / GPT-2 style: one c_attn linear split on the last dim, then an out linear."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, H, D).transpose(1, 2) for t in self.c_attn(x).split(E, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, s, E))

    def kv_rows(self):
        return [(self.c_attn.weight[E:2 * E], self.c_attn.bias[E:2 * E]),
                (self.c_attn.weight[2 * E:], self.c_attn.bias[2 * E:])]

    def out_weight(self):
        return self.c_proj.weight


class TorchMHA(nn.Module):
    """nn.MultiheadAttention: packed in_proj_weight (unflatten / select), out_proj."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]

    def kv_rows(self):
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        return [(w[E:2 * E], b[E:2 * E]), (w[2 * E:], b[2 * E:])]

    def out_weight(self):
        return self.attn.out_proj.weight


FORMS = {"separate": SeparateProjections, "packed_permuted": PackedPermuted,
         "packed_split": PackedSplit, "torch_mha": TorchMHA}


def _model(form: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FORMS[form]().eval()


def _tie_heads(model, pairs) -> None:
    """Make kv heads equal within each pair (so pooling them is exact)."""
    with torch.no_grad():
        for weight, bias in model.kv_rows():
            for first, second in pairs:
                weight[second * D:(second + 1) * D] = weight[first * D:(first + 1) * D]
                bias[second * D:(second + 1) * D] = bias[first * D:(first + 1) * D]


def _silence_heads(model, heads) -> None:
    with torch.no_grad():
        for head in heads:
            model.out_weight()[:, head * D:(head + 1) * D] = 0.0


def _x():
    return torch.randn(B, S, E)


def _weights(optimized) -> dict:
    (record,) = [r for r in optimized.report.sites if r.site is not None]
    return record


def _region(optimized):
    (region,) = optimized._attnopt_state.whole_regions
    return region


def _attention_nodes(optimized):
    graph = _region(optimized).rewritten.graph
    return [n for n in graph.nodes if n.target is torch.ops.attnopt.attention.default]


# --------------------------------------------------------------------------------------------
# GQA conversion


@pytest.mark.parametrize("form", sorted(FORMS))
def test_gqa_pools_equal_heads_exactly_and_shrinks_projections(form):
    model = _model(form)
    _tie_heads(model, [(0, 1), (2, 3)])
    x = _x()
    expected = model(x)
    optimized = attnopt.optimize(model, gqa_policy(grouping="contiguous"), example_inputs=(x,))
    record = _weights(optimized)
    assert record.rolled_back is None
    gqa = record.approximation["weights"]["gqa"]
    assert (gqa["from_kv_heads"], gqa["kv_heads"], gqa["groups"]) == (4, 2, [[0, 1], [2, 3]])
    (node,) = _attention_nodes(optimized)
    q, k, v = (node.args[i].meta["val"] for i in range(3))
    assert (q.shape[1], k.shape[1], v.shape[1]) == (H, 2, 2) and node.args[6] is True
    fresh = _x()
    torch.testing.assert_close(optimized(x), expected, atol=EXACT_TOL, rtol=0)
    torch.testing.assert_close(optimized(fresh), model(fresh), atol=EXACT_TOL, rtol=0)
    # k and v lost half their rows: 2 × (E/2 × E weights + E/2 biases) × 4 bytes
    saved = 2 * (E // 2 * E + E // 2) * 4
    parameters = optimized.report.parameters
    assert parameters["before_bytes"] - parameters["after_bytes"] == saved
    assert "gqa(kv heads 4→2, contiguous)" in str(optimized.report)


def test_gqa_best_grouping_finds_heads_alike_out_of_order():
    model = _model("separate")
    _tie_heads(model, [(0, 2), (1, 3)])
    x = _x()
    optimized = attnopt.optimize(model, gqa_policy(grouping="best"), example_inputs=(x,))
    gqa = _weights(optimized).approximation["weights"]["gqa"]
    assert gqa["grouping"] == "clustered" and gqa["groups"] == [[0, 2], [1, 3]]
    assert gqa["errors"]["clustered"] < 1e-6 < 0.05 < gqa["errors"]["contiguous"]
    # the query heads and out-projection columns are permuted to match: still exact
    fresh = _x()
    torch.testing.assert_close(optimized(fresh), model(fresh), atol=EXACT_TOL, rtol=0)


def test_gqa_converts_a_grouped_model_further_down():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the two kv heads of each layer equal: MQA loses nothing
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[D:] = proj.weight[:D]
    inputs = dict(input_ids=torch.randint(0, 64, (2, 8)), use_cache=False)
    optimized = attnopt.optimize(model, gqa_policy(kv_heads=1), example_kwargs=inputs)
    records = [r for r in optimized.report.sites if r.site is not None]
    assert len(records) == 2
    assert all(r.approximation["weights"]["gqa"]["kv_heads"] == 1 for r in records)
    fresh = dict(input_ids=torch.randint(0, 64, (2, 8)), use_cache=False)
    torch.testing.assert_close(optimized(**fresh).logits, model(**fresh).logits,
                               atol=EXACT_TOL, rtol=0)


def test_gqa_on_independent_heads_is_rolled_back_and_the_model_is_unchanged():
    model = _model("separate")
    x = _x()
    optimized = attnopt.optimize(model, gqa_policy(kv_heads=1), example_inputs=(x,))
    record = _weights(optimized)
    assert record.rolled_back is not None and "gqa" in record.reason
    assert record.rolled_back["rel_err"] > 0.5
    fresh = _x()
    torch.testing.assert_close(optimized(fresh), model(fresh), atol=EXACT_TOL, rtol=0)
    assert optimized.report.parameters["before_bytes"] == \
        optimized.report.parameters["after_bytes"]


# --------------------------------------------------------------------------------------------
# head pruning


@pytest.mark.parametrize("form", sorted(FORMS))
def test_prune_removes_the_silent_heads_exactly(form):
    model = _model(form)
    _silence_heads(model, [1, 3])
    x = _x()
    optimized = attnopt.optimize(model, prune_policy(fraction=0.5), example_inputs=(x,))
    record = _weights(optimized)
    assert record.rolled_back is None
    pruned = record.approximation["weights"]["prune_heads"]
    assert pruned["kept"] == [0, 2]
    assert pruned["head_importance"][1] == pruned["head_importance"][3] == 0.0
    (node,) = _attention_nodes(optimized)
    assert [node.args[i].meta["val"].shape[1] for i in range(3)] == [2, 2, 2]
    fresh = _x()
    torch.testing.assert_close(optimized(fresh), model(fresh), atol=EXACT_TOL, rtol=0)
    # q, k, v lose half their rows (weights and biases), out loses half its columns
    saved = (3 * (E // 2 * E + E // 2) + E * E // 2) * 4
    parameters = optimized.report.parameters
    assert parameters["before_bytes"] - parameters["after_bytes"] == saved


def test_gradient_importance_prunes_the_head_the_loss_ignores():
    """Head h writes only output features [8h, 8h + 8); head 3 writes them 10× louder, but
    the loss reads features [0, 24) only. By output norm head 3 matters most; by the loss's
    gradient it does not matter at all."""
    model = _model("separate")
    with torch.no_grad():
        weight = torch.zeros(E, E)
        for head in range(H):
            block = torch.randn(D, D) * (10.0 if head == 3 else 1.0)
            weight[head * D:(head + 1) * D, head * D:(head + 1) * D] = block
        model.o.weight.copy_(weight)
        model.o.bias.zero_()
    x = _x()
    policy = prune_policy(fraction=0.25)

    def loss(output):
        return output[..., :3 * D].pow(2).mean()

    by_norm = attnopt.optimize(model, policy, example_inputs=(x,), verify=False)
    by_loss = attnopt.optimize(model, policy, example_inputs=(x,), verify=False, loss=loss)
    norm_info = _weights(by_norm).approximation["weights"]["prune_heads"]
    loss_info = _weights(by_loss).approximation["weights"]["prune_heads"]
    assert norm_info["importance"] == "output_norm" and 3 in norm_info["kept"]
    assert loss_info["importance"] == "gradient" and loss_info["kept"] == [0, 1, 2]
    assert loss_info["head_importance"][3] == 0.0
    fresh = _x()
    with torch.no_grad():  # what the loss reads is untouched
        torch.testing.assert_close(by_loss(fresh)[..., :3 * D], model(fresh)[..., :3 * D],
                                   atol=EXACT_TOL, rtol=0)
    assert all(p.grad is None for p in model.parameters())  # the user's model is untouched


def test_gradient_importance_without_a_loss_is_refused():
    model = _model("separate")
    optimized = attnopt.optimize(model, prune_policy(importance="gradient"),
                                 example_inputs=(_x(),))
    assert any("needs optimize(..., loss=...)" in n for n in _weights(optimized).weight_notes)


def test_prune_whole_groups_on_a_grouped_site():
    class Grouped(SeparateProjections):
        def __init__(self):
            super().__init__()
            self.k, self.v = nn.Linear(E, E // 2), nn.Linear(E, E // 2)

        def forward(self, x):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, H, D).transpose(1, 2)
            k, v = (p(x).view(b, s, 2, D).transpose(1, 2) for p in (self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(b, s, E))

    torch.manual_seed(0)
    model = Grouped().eval()
    _silence_heads(model, [0, 1])  # the query heads of kv group 0
    x = _x()
    optimized = attnopt.optimize(model, prune_policy(fraction=0.5), example_inputs=(x,))
    assert _weights(optimized).approximation["weights"]["prune_heads"]["kept"] == [2, 3]
    (node,) = _attention_nodes(optimized)
    assert [node.args[i].meta["val"].shape[1] for i in range(3)] == [2, 1, 1]
    fresh = _x()
    torch.testing.assert_close(optimized(fresh), model(fresh), atol=EXACT_TOL, rtol=0)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_weight_rewrites_compose_with_each_other(form):
    """Pruning rebuilds a packed projection as one matmul per operand; GQA then traces those."""
    model = _model(form)
    _silence_heads(model, [2, 3])
    _tie_heads(model, [(0, 1)])
    policy = Policy("compose", weights=[Rule("prune_heads", params={"fraction": 0.5}),
                                        Rule("gqa", params={"kv_heads": 1})])
    x = _x()
    optimized = attnopt.optimize(model, policy, example_inputs=(x,))
    weights = _weights(optimized).approximation["weights"]
    assert weights["prune_heads"]["kept"] == [0, 1] and weights["gqa"]["kv_heads"] == 1
    (node,) = _attention_nodes(optimized)
    assert [node.args[i].meta["val"].shape[1] for i in range(3)] == [2, 1, 1]
    fresh = _x()
    torch.testing.assert_close(optimized(fresh), model(fresh), atol=EXACT_TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# what is left alone, and bad input


def test_sites_without_an_out_projection_are_not_pruned_and_say_why():
    class NoOutProjection(SeparateProjections):
        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
            return F.scaled_dot_product_attention(q, k, v)

    torch.manual_seed(0)
    model = NoOutProjection().eval()
    x = _x()
    optimized = attnopt.optimize(model, prune_policy(), example_inputs=(x,))
    record = _weights(optimized)
    assert record.approximation is None
    assert any("prune_heads not applied" in n and "out-projection" in n
               for n in record.weight_notes)
    torch.testing.assert_close(optimized(x), model(x), atol=EXACT_TOL, rtol=0)


class ALiBiBlock(SeparateProjections):
    """A per-head additive bias (ALiBi slopes) as the attention mask."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        slopes = 2.0 ** (-torch.arange(1, H + 1, dtype=x.dtype))
        distance = (torch.arange(s)[None, :] - torch.arange(s)[:, None]).abs().to(x.dtype)
        bias = -slopes[:, None, None] * distance  # (H, S, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(b, s, E))


def test_per_head_masks_follow_the_pruned_and_permuted_heads(tmp_path):
    torch.manual_seed(0)
    model = ALiBiBlock().eval()
    _silence_heads(model, [1, 3])
    x = _x()
    pruned = attnopt.optimize(model, prune_policy(fraction=0.5), example_inputs=(x,))
    assert _weights(pruned).approximation["weights"]["prune_heads"]["kept"] == [0, 2]
    torch.manual_seed(1)
    model_2 = ALiBiBlock().eval()
    _tie_heads(model_2, [(0, 2), (1, 3)])
    grouped = attnopt.optimize(model_2, gqa_policy(grouping="best"), example_inputs=(x,))
    gqa = _weights(grouped).approximation["weights"]["gqa"]
    assert gqa["grouping"] == "clustered" and gqa["errors"]["clustered"] < 1e-6
    fresh = _x()
    with torch.no_grad():
        torch.testing.assert_close(pruned(fresh), model(fresh), atol=EXACT_TOL, rtol=0)
        torch.testing.assert_close(grouped(fresh), model_2(fresh), atol=EXACT_TOL, rtol=0)
    result = attnopt.export_onnx(pruned, str(tmp_path / "alibi.onnx"), example_inputs=(x,))
    assert result.passed and result.op_histogram.get("Gather")


def test_a_per_head_tensor_on_the_path_refuses_pruning():
    class PerHeadScale(SeparateProjections):
        def __init__(self):
            super().__init__()
            self.head_scale = nn.Parameter(torch.rand(1, H, 1, 1) + 0.5)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q * self.head_scale, k, v)
            return self.o(y.transpose(1, 2).reshape(b, s, E))

    torch.manual_seed(0)
    model = PerHeadScale().eval()
    x = _x()
    optimized = attnopt.optimize(model, prune_policy(fraction=0.5), example_inputs=(x,))
    record = _weights(optimized)
    assert record.approximation is None
    assert any("per-head tensor" in n for n in record.weight_notes)
    torch.testing.assert_close(optimized(x), model(x), atol=EXACT_TOL, rtol=0)


def test_sites_fed_by_plain_inputs_are_left_alone():
    class NoProjections(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    optimized = attnopt.optimize(NoProjections(), gqa_policy(), example_inputs=(q, k, v))
    record = _weights(optimized)
    assert any("no plain projection" in n for n in record.weight_notes)


def test_weight_policies_are_validated_and_round_trip():
    with pytest.raises(PolicyError, match="weight rewrite"):
        Policy("bad", rules=[Rule("gqa")])
    with pytest.raises(PolicyError, match="weight rewrites are"):
        Policy("bad", weights=[Rule("performer")])
    with pytest.raises(PolicyError, match="grouping"):
        Rule("gqa", params={"grouping": "random"})
    with pytest.raises(PolicyError, match="unknown parameter"):
        Rule("prune_heads", params={"heads": 2})
    policy = Policy("p", weights=[Rule("gqa", params={"kv_heads": 2}),
                                  Rule("prune_heads", params={"fraction": 0.5})])
    again = Policy.from_json(policy.to_json())
    assert again.to_dict() == policy.to_dict() and again.approximates


# --------------------------------------------------------------------------------------------
# deployment: what is saved is smaller and runs


def test_converted_model_exports_smaller_files_that_run(tmp_path):
    from attnopt.convert import save_pt2
    model = _model("separate")
    _tie_heads(model, [(0, 1)])
    _silence_heads(model, [2, 3])
    x = _x()
    policy = Policy("compact-test", weights=[Rule("prune_heads", params={"fraction": 0.5}),
                                             Rule("gqa", params={"grouping": "contiguous"})])
    exact = attnopt.optimize(model, "exact", example_inputs=(x,))
    compact = attnopt.optimize(model, policy, example_inputs=(x,))
    weights = _weights(compact).approximation["weights"]
    assert weights["prune_heads"]["kept"] == [0, 1] and weights["gqa"]["kv_heads"] == 1
    exported = {}
    for name, optimized in (("exact", exact), ("compact", compact)):
        result = attnopt.export_onnx(optimized, str(tmp_path / f"{name}.onnx"),
                                     example_inputs=(x,))
        assert result.passed, result.errors
        exported[name] = result.file_bytes
        save_pt2(optimized, tmp_path / f"{name}.pt2", (x,), {})
    assert exported["compact"] < exported["exact"]
    assert (tmp_path / "compact.pt2").stat().st_size < (tmp_path / "exact.pt2").stat().st_size
    loaded = torch.export.load(str(tmp_path / "compact.pt2")).module()
    fresh = _x()
    torch.testing.assert_close(loaded(fresh), model(fresh), atol=EXACT_TOL, rtol=0)


def test_gpt2_conv1d_heads_are_pruned_exactly():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=E, n_layer=2, n_head=H,
                                     n_positions=16, n_inner=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # Conv1D weights are (in, out): a head's input rows of c_proj
        for block in model.transformer.h:
            block.attn.c_proj.weight[D:2 * D] = 0.0
            block.attn.c_proj.weight[3 * D:] = 0.0
    inputs = dict(input_ids=torch.randint(0, 64, (2, 8)), use_cache=False)
    optimized = attnopt.optimize(model, prune_policy(fraction=0.5), example_kwargs=inputs)
    records = [r for r in optimized.report.sites if r.site is not None]
    assert [r.approximation["weights"]["prune_heads"]["kept"] for r in records] == [[0, 2]] * 2
    fresh = dict(input_ids=torch.randint(0, 64, (2, 8)), use_cache=False)
    torch.testing.assert_close(optimized(**fresh).logits, model(**fresh).logits,
                               atol=EXACT_TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Hugging Face models


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=E, num_hidden_layers=2,
                                         num_attention_heads=H, intermediate_size=64,
                                         attn_implementation="sdpa")
        return transformers.BertModel(config).eval(), dict(
            input_ids=torch.randint(0, 64, (2, 8)))
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=E, n_layer=2, n_head=H,
                                         n_positions=16, n_inner=64,
                                         attn_implementation="eager")
        return transformers.GPT2LMHeadModel(config).eval(), dict(
            input_ids=torch.randint(0, 64, (2, 8)), use_cache=False)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=E, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=H,
                                      num_key_value_heads=2, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval(), dict(
        input_ids=torch.randint(0, 64, (2, 8)), use_cache=False)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_every_weight_rewrite_applies_to_hugging_face_models_and_exports(name, tmp_path):
    """Unguarded (random heads make pruning and pooling lossy): every site takes every rewrite
    that fits it, the parameters shrink, and the exported ONNX agrees with PyTorch."""
    model, inputs = _hf(name)
    policy = Policy("all", weights=[Rule("prune_heads", params={"fraction": 0.5}),
                                    Rule("gqa", params={"group_size": 2}),
                                    Rule("int8", params={"mode": "dynamic"})])
    optimized = attnopt.optimize(model, policy, example_kwargs=inputs, verify=False)
    records = [r for r in optimized.report.sites if r.site is not None]
    assert len(records) == 2
    # Llama: 4 heads over 2 kv heads; pruning half leaves 1 kv head, which GQA cannot pool
    expected = ["prune_heads", "int8"] if name == "llama" else ["prune_heads", "gqa", "int8"]
    for record in records:
        assert list(record.approximation["weights"]) == expected
    parameters = optimized.report.parameters
    assert parameters["after_bytes"] < parameters["before_bytes"]
    result = attnopt.export_onnx(optimized, str(tmp_path / f"{name}.onnx"),
                                 example_kwargs=inputs)
    assert result.passed and result.op_histogram.get("MatMulInteger") == 8
    # Llama: torch.onnx's RoPE fusion would break it in onnxruntime, so it is left out
    assert bool(result.workarounds) == (name == "llama")


def test_cross_attention_with_split_in_projection_is_rebuilt():
    """nn.MultiheadAttention over a memory splits in_proj_weight into q rows and kv rows."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x, memory):
            return self.attn(x, memory, memory, need_weights=False)[0]

    torch.manual_seed(0)
    model = Cross().eval()
    with torch.no_grad():
        model.attn.out_proj.weight[:, 1 * D:2 * D] = 0.0
        model.attn.out_proj.weight[:, 3 * D:] = 0.0
    x, memory = _x(), torch.randn(B, S + 4, E)
    policy = Policy("cross", weights=[Rule("prune_heads", params={"fraction": 0.5}),
                                      Rule("int8", params={"mode": "dynamic"})])
    optimized = attnopt.optimize(model, policy, example_inputs=(x, memory))
    weights = _weights(optimized).approximation["weights"]
    assert weights["prune_heads"]["kept"] == [0, 2]
    assert weights["int8"]["quantized"] == ["q", "k", "v", "out"]  # pruning split kv
    fresh, fresh_memory = _x(), torch.randn(B, S + 4, E)
    with torch.no_grad():
        expected = model(fresh, fresh_memory)
        error = float((optimized(fresh, fresh_memory) - expected).norm() / expected.norm())
    assert error < 0.04  # int8 rounding only: the pruned heads wrote nothing
    gm = optimized._attnopt_state.whole_regions[0].rewritten
    assert not hasattr(gm.attn, "in_proj_weight")  # the packed parameter left the graph
