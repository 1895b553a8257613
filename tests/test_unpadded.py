"""Graphs specialized for unpadded batches (`attnopt/unpadded.py`): a call whose attention_mask
is all ones runs a copy of the rewritten graph without the masks that makes redundant and
without the code that builds them; padded calls, and masks the all-ones input does not make
redundant, run the rewritten graph with its masks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import attnopt
from attnopt.ops import ATTENTION_OP
from attnopt.ops.attention import eager_attention
from attnopt.passes.heads import site_args
from attnopt.unpadded import UNPADDED_ENV

TOL = 1e-5  # rewritten against original, float32


def _attend(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores + mask, dim=-1) @ v


class PaddedEncoder(nn.Module):
    """Two attention layers sharing an additive padding mask built from attention_mask, as
    Hugging Face encoders build theirs: (B, 1, 1, S) expanded to (B, 1, S, S)."""

    def __init__(self, dim: int = 16, heads: int = 2, lookahead: int = -1,
                 learned_mask: bool = False):
        super().__init__()
        self.heads, self.lookahead = heads, lookahead
        self.proj = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(2))
        self.bias = nn.Parameter(torch.zeros(1)) if learned_mask else None

    def mask(self, attention_mask, seq):
        keep = attention_mask[:, None, None, :].bool().expand(-1, 1, seq, seq)
        if self.lookahead >= 0:  # keys up to `lookahead` after each query only
            position = torch.arange(seq, device=attention_mask.device)
            keep = keep & (position[None, :] <= position[:, None] + self.lookahead)
        mask = torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, torch.finfo(torch.float32).min)
        return mask if self.bias is None else mask + self.bias

    def forward(self, x, attention_mask):
        batch, seq, dim = x.shape
        mask = self.mask(attention_mask, seq)
        for proj in self.proj:
            q, k, v = proj(x).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            x = x + _attend(q, k, v, mask).transpose(1, 2).reshape(batch, seq, dim)
        return x


def _inputs(batch=2, seq=8, padded=True, dim=16, device="cpu"):
    x = torch.randn(batch, seq, dim, device=device)
    attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    if padded:
        attention_mask[1, seq - 3:] = 0
    return x, attention_mask


def _region(optimized):
    (region,) = optimized._attnopt_state.whole_regions
    return region


def _optimized(model_class, **options):
    """A `model_class(**options)` in eval mode (seeded weights), optimized on a padded example:
    (model, optimized model, its region)."""
    torch.manual_seed(0)
    model = model_class(**options).eval()
    optimized = attnopt.optimize(model, "exact", example_inputs=_inputs())
    return model, optimized, _region(optimized)


def _attention_calls(graph_module) -> list:
    """The arguments of each canonical attention call (the op, or its eager entry in the
    copies calls run), padded as `site_args` pads them."""
    return [site_args(node) for node in graph_module.graph.nodes
            if node.target in (ATTENTION_OP, eager_attention)]


def _masked_sites(graph_module) -> int:
    return sum(1 for call in _attention_calls(graph_module) if call[3] is not None)


@pytest.fixture(autouse=True)
def _specialization_on(monkeypatch):
    monkeypatch.delenv(UNPADDED_ENV, raising=False)


@torch.no_grad()
def test_all_ones_mask_runs_the_graph_without_the_mask_build():
    model, optimized, region = _optimized(PaddedEncoder)
    x, ones = _inputs(padded=False)

    out = optimized(x, ones)
    specialized = region.runner((x, ones), {})
    assert specialized is not region.runner()
    assert _masked_sites(region.rewritten) == _masked_sites(region.runner()) == 2
    assert len(_attention_calls(specialized)) == 2 and _masked_sites(specialized) == 0
    assert not any(node.target is torch.ops.aten.masked_fill.Scalar
                   for node in specialized.graph.nodes)  # the mask build is gone
    assert (out - model(x, ones)).abs().max().item() < TOL
    assert "attention_mask is all ones" in " ".join(optimized.report.notes)
    os.environ[UNPADDED_ENV] = "0"
    assert torch.equal(out, optimized(x, ones))  # what the op's own check gives, bit for bit


@torch.no_grad()
def test_padded_call_keeps_its_mask():
    model, optimized, region = _optimized(PaddedEncoder)
    x, padded = _inputs()
    ones = torch.ones_like(padded)
    optimized(x, ones)  # (the same shape, all ones: the copy without masks exists)
    assert region.runner((x, padded), {}) is region.runner()
    assert (optimized(x, padded) - model(x, padded)).abs().max().item() < TOL


@torch.no_grad()
def test_each_input_shape_is_evaluated_and_shares_the_copy():
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    optimized = attnopt.optimize(model, "exact", example_inputs=_inputs(), dynamic=True)
    region = _region(optimized)
    for seq in (8, 12, 8):
        x, ones = _inputs(seq=seq, padded=False)
        assert (optimized(x, ones) - model(x, ones)).abs().max().item() < TOL
    unpadded = region.unpadded()
    assert len(unpadded._answers) == 2  # one evaluation per shape
    assert len(unpadded._runners) == 1  # the same answers: one copy
    assert set(dict(next(iter(unpadded._answers.values()))).values()) == {False}


@torch.no_grad()
def test_mask_that_stays_needed_with_all_ones_is_kept(monkeypatch):
    """A lookahead band: all ones leave a mask that neither hides nothing nor is causal. Once
    that is known for a shape, calls of that shape no longer read their mask inputs."""
    import attnopt.unpadded as unpadded
    model, optimized, region = _optimized(PaddedEncoder, lookahead=2)
    reads = []
    all_ones = unpadded.all_ones
    monkeypatch.setattr(unpadded, "all_ones", lambda masks: reads.append(1) or all_ones(masks))
    x, ones = _inputs(padded=False)
    out = optimized(x, ones)
    assert region.unpadded() is not None
    assert set(dict(next(iter(region.unpadded()._answers.values()))).values()) == {None}
    assert region.runner((x, ones), {}) is region.runner()
    assert (out - model(x, ones)).abs().max().item() < TOL
    assert len(reads) == 1
    x, padded = _inputs()
    assert (optimized(x, padded) - model(x, padded)).abs().max().item() < TOL
    assert len(reads) == 1  # (the same shape: nothing to gain from reading the inputs)


@torch.no_grad()
def test_causal_padding_mask_becomes_causal():
    """A decoder's causal mask with padding: all ones leave the causal mask alone, which the
    copy runs as `is_causal`."""
    model, optimized, region = _optimized(PaddedEncoder, lookahead=0)
    x, ones = _inputs(padded=False)
    out = optimized(x, ones)
    specialized = region.runner((x, ones), {})
    sites = _attention_calls(specialized)
    assert len(sites) == 2 and all(s[3] is None and s[4] is True for s in sites)
    assert (out - model(x, ones)).abs().max().item() < TOL


def test_masks_from_input_ids_or_parameters_are_not_specialized():
    torch.manual_seed(0)

    class FromIds(PaddedEncoder):
        def forward(self, x, ids):  # padding where ids == 0: ids are no mask input
            return super().forward(x, (ids != 0).long())
    ids = torch.randint(1, 50, (2, 8))
    ids[1, 5:] = 0
    optimized = attnopt.optimize(FromIds().eval(), "exact",
                                 example_inputs=(torch.randn(2, 8, 16), ids))
    region = _region(optimized)
    assert region.unpadded() is None

    learned = PaddedEncoder(learned_mask=True)
    optimized = attnopt.optimize(learned, "exact", example_inputs=_inputs())
    region = _region(optimized)
    assert region.unpadded() is None


class TwoMasks(nn.Module):
    """Two sites, each with a mask from its own attention_mask (an encoder's and a
    decoder's, as in encoder-decoder models): the copy runs only when both are all ones."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = PaddedEncoder(), PaddedEncoder(lookahead=0)

    def forward(self, x, attention_mask, decoder_attention_mask):
        return self.decoder(self.encoder(x, attention_mask), decoder_attention_mask)


@torch.no_grad()
def test_every_mask_input_must_be_all_ones():
    torch.manual_seed(0)
    model = TwoMasks().eval()
    x, padded = _inputs()
    optimized = attnopt.optimize(model, "exact", example_inputs=(x, padded, padded.clone()))
    region = _region(optimized)
    ones = torch.ones_like(padded)
    assert len(region.unpadded().inputs) == 2
    for masks in ((ones, padded), (padded, ones), (ones, ones)):
        out = optimized(x, *masks)
        assert (out - model(x, *masks)).abs().max().item() < TOL
        copy = region.runner((x, *masks), {})
        assert (copy is not region.runner()) == (masks[0] is ones and masks[1] is ones)
    assert _masked_sites(region.runner((x, ones, ones), {})) == 0


class AlibiDecoder(PaddedEncoder):
    """A causal mask with padding plus ALiBi's key-position bias `slope[h] * j`, built from
    attention_mask as BLOOM, MPT and Falcon build theirs (per head: (B, H, S, S))."""

    def __init__(self, lookahead: int = 0, per_row: bool = False, power: float = 1.0,
                 **sizes):
        super().__init__(lookahead=lookahead, **sizes)
        self.per_row = per_row  # slopes scaled by 1 + the batch row (no model does this)
        self.power = power  # a bias growing as j ** power: not ALiBi unless 1
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, self.heads + 1).float())

    def mask(self, attention_mask, seq):
        position = torch.arange(seq, device=attention_mask.device, dtype=torch.float32)
        alibi = self.slopes[:, None, None] * position ** self.power  # (H, 1, S)
        if self.per_row:
            rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
            alibi = alibi * (1 + rows.float())[:, None, None, None]
        return super().mask(attention_mask, seq) + alibi


@torch.no_grad()
def test_all_ones_alibi_mask_becomes_causal_attention_with_slopes():
    model, optimized, region = _optimized(AlibiDecoder)
    x, ones = _inputs(padded=False)
    out = optimized(x, ones)
    specialized = region.runner((x, ones), {})
    calls = _attention_calls(specialized)
    assert len(calls) == 2 and all(c[3] is None and c[4] is True for c in calls)
    slopes = {node.target: getattr(specialized, node.target) for node in specialized.graph.nodes
              if node.op == "get_attr" and "alibi" in node.target}
    assert len(slopes) == 1
    assert torch.equal(next(iter(slopes.values())), model.slopes)
    assert (out - model(x, ones)).abs().max().item() < TOL
    x, padded = _inputs()
    assert region.runner((x, padded), {}) is region.runner()
    assert (optimized(x, padded) - model(x, padded)).abs().max().item() < TOL


@pytest.mark.parametrize("options", [{"lookahead": 2}, {"per_row": True}, {"power": 1.5}],
                         ids=["band", "per-row-slopes", "not-linear"])
@torch.no_grad()
def test_bias_that_is_not_causal_alibi_keeps_its_mask(options):
    """A band wider than causal, slopes that differ between batch rows, a bias that does not
    grow linearly along the keys: no slopes stand for such a mask."""
    model, optimized, region = _optimized(AlibiDecoder, **options)
    x, ones = _inputs(padded=False)
    assert (optimized(x, ones) - model(x, ones)).abs().max().item() < TOL
    assert set(dict(next(iter(region.unpadded()._answers.values()))).values()) == {None}


@torch.no_grad()
def test_hugging_face_alibi_decoders_run_slopes_on_unpadded_batches():
    """BLOOM and MPT build their ALiBi from attention_mask: an all-ones batch runs the
    canonical op's ALiBi from slopes instead of the dense bias."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(3, 100, (2, 8))
    ones = torch.ones(2, 8, dtype=torch.long)
    for config in (transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4),
                   transformers.MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4,
                                          max_seq_len=32, expansion_ratio=2)):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        kwargs = {"input_ids": ids, "attention_mask": ones, "use_cache": False}
        optimized = attnopt.optimize(model, "exact", example_kwargs=kwargs)
        out = optimized(**kwargs).logits
        assert (out - model(**kwargs).logits).abs().max().item() < TOL
        region = _region(optimized)
        answers = dict(next(iter(region.unpadded()._answers.values())))
        assert len(answers) == 2 and all(a[0] == "alibi" for a in answers.values())
        calls = _attention_calls(region.runner((), kwargs))
        assert all(c[3] is None and c[4] is True and c[9] is not None for c in calls)


@pytest.mark.parametrize("failing", ["_evaluate", "specialized"])
@torch.no_grad()
def test_a_failing_specialization_warns_once_and_runs_the_graph(monkeypatch, failing):
    """The copy is an optimization: where evaluating the masks or making the copy fails, the
    call runs the rewritten graph with its masks, with one warning."""
    from attnopt.unpadded import UnpaddedGraphs
    model, optimized, _ = _optimized(PaddedEncoder)

    def fail(*args, **kwargs):
        raise RuntimeError("broken")
    monkeypatch.setattr(UnpaddedGraphs, failing, fail)
    x, ones = _inputs(padded=False)
    with pytest.warns(RuntimeWarning, match="unpadded copy"):
        out = optimized(x, ones)
    assert (out - model(x, ones)).abs().max().item() < TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(optimized(x, ones), out)  # (no second warning)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@torch.no_grad()
def test_copies_on_each_device(device):
    """The padding mask dropped and ALiBi turned into slopes where the model runs: on CUDA the
    check, the evaluation and the fit read device tensors, and the slopes run the kernel (head
    dim 32, float32)."""
    for model in (PaddedEncoder(dim=64, heads=2), AlibiDecoder(dim=64, heads=2)):
        torch.manual_seed(0)
        model = model.to(device).eval()
        optimized = attnopt.optimize(model, "exact", example_inputs=_inputs(
            seq=64, dim=64, device=device))
        region = _region(optimized)
        x, ones = _inputs(seq=64, padded=False, dim=64, device=device)
        out = optimized(x, ones)
        assert (out - model(x, ones)).abs().max().item() < TOL
        calls = _attention_calls(region.runner((x, ones), {}))
        assert len(calls) == 2 and all(c[3] is None for c in calls)
        if isinstance(model, AlibiDecoder):
            assert all(c[4] is True and c[9] is not None for c in calls)
        x, padded = _inputs(seq=64, dim=64, device=device)
        assert (optimized(x, padded) - model(x, padded)).abs().max().item() < TOL
