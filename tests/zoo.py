"""The zoo: each hand-written attention form as its own small module.

`ZOO` maps a case name to (module factory, example-input factory, expected site count).
`NEGATIVES` are softmax uses that are not (supported) attention and must be left alone.
Shape letters: B batch, H heads, S sequence, D head dim, E model width.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

B, H, S, D = 2, 4, 8, 8
E = H * D


def _qkv():
    return tuple(torch.randn(B, H, S, D) for _ in range(3))


class Case(NamedTuple):
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    sites: int


class FusedSDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class FusedCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


class FusedBoolMask(nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


class FusedGQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class MatmulDivide(nn.Module):
    """scores / sqrt(d), padding mask broadcast from (B, S) with masked_fill(-inf)."""

    def forward(self, q, k, v, attention_mask):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), v)


class BmmMergedHeads(nn.Module):
    """(B·H, S, D) operands, bmm, multiply by scale."""

    def forward(self, q, k, v):
        q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
        probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * D ** -0.5, dim=-1)
        return torch.bmm(probs, v).view(B, H, S, D)


class BaddbmmBias(nn.Module):
    def forward(self, q, k, v, bias):
        q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
        scores = torch.baddbmm(bias, q * D ** -0.5, k.transpose(-2, -1))
        return torch.bmm(F.softmax(scores, dim=-1), v)


class Einsum(nn.Module):
    def forward(self, q, k, v):
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
        return torch.einsum("bhqk,bhkd->bqhd", scores.softmax(-1), v)


class EinsumEllipsis(nn.Module):
    def forward(self, q, k, v):
        scores = torch.einsum("...qd,...kd->...qk", q / math.sqrt(D), k)
        return torch.einsum("...qk,...kd->...qd", scores.softmax(-1), v)


class PreScaledQuery(nn.Module):
    def forward(self, q, k, v):
        q = q * D ** -0.5
        return F.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class RootScaleBoth(nn.Module):
    """Scale split as d^-1/4 on q and on k (as in some vision models)."""

    def forward(self, q, k, v):
        root = D ** -0.25
        return torch.softmax((q * root) @ (k * root).transpose(-2, -1), dim=-1) @ v


class WhereFinfoMin(nn.Module):
    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-2, -1) * D ** -0.5
        scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v


class UpcastSoftmax(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


class SoftmaxDtype(nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1,
                              dtype=torch.float32)
        return probs.type_as(v) @ v


class DropoutAndClone(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.2)

    def forward(self, q, k, v):
        probs = self.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1)).clone()
        return probs @ v


class BSHDLayout(nn.Module):
    """Projections in (B, S, H, D); permutes into heads-first inside attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, 3, H, D).unbind(2)
        scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / math.sqrt(D)
        out = scores.softmax(-1) @ v.transpose(1, 2)
        return self.out(out.transpose(1, 2).reshape(B, S, E))


class GQARepeatInterleave(nn.Module):
    def forward(self, q, k, v):
        k, v = k[:, :2], v[:, :2]
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v


class GQAExpandReshape(nn.Module):
    """Hugging Face's repeat_kv: x[:, :, None].expand(...).reshape(...)."""

    def forward(self, q, k, v):
        def repeat_kv(x, n):
            b, kvh, s, d = x.shape
            return x[:, :, None, :, :].expand(b, kvh, n, s, d).reshape(b, kvh * n, s, d)
        k, v = repeat_kv(k[:, :1], H), repeat_kv(v[:, :1], H)
        return torch.softmax(q @ k.transpose(2, 3) / math.sqrt(D), -1) @ v


class ALiBi(nn.Module):
    def __init__(self):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])
        self.register_buffer("slopes", slopes)

    def forward(self, q, k, v):
        positions = torch.arange(S, device=q.device)
        distance = (positions[None, :] - positions[:, None]).abs().float()
        bias = -self.slopes[:, None, None] * distance
        scores = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        return scores.softmax(-1) @ v


class RelativeBias(nn.Module):
    """T5-style learned relative position bias, no score scaling."""

    def __init__(self, buckets: int = 2 * S - 1):
        super().__init__()
        self.bias = nn.Embedding(buckets, H)

    def forward(self, q, k, v):
        positions = torch.arange(S, device=q.device)
        relative = positions[None, :] - positions[:, None] + S - 1
        bias = self.bias(relative).permute(2, 0, 1).unsqueeze(0)
        return torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1) @ v


class CrossAttention(nn.Module):
    """Queries of length S over 2S keys."""

    def forward(self, q, memory_k, memory_v):
        return torch.softmax(q @ memory_k.transpose(-2, -1) * D ** -0.5, -1) @ memory_v


class MaterializedCausal(nn.Module):
    """Hugging Face style: a float mask of 0 / finfo.min built from shapes, added."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        mask = torch.full((s, s), torch.finfo(q.dtype).min, device=q.device).triu(1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D) + mask[None, None]
        return scores.softmax(-1) @ v


class SlidingWindow(nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        allowed = (j <= i) & (j > i - 3)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ v


class MHANeedWeights(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=self.need_weights)
        return out


class MHAKeyPadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, key_padding_mask):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask)[0]


def _x():
    return (torch.randn(B, S, E),)


def _padding():
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    return mask


def _keep():
    keep = torch.rand(B, 1, S, S) > 0.3
    keep[..., 0] = True
    return keep


ZOO: dict[str, Case] = {
    "fused_sdpa": Case(FusedSDPA, _qkv, 1),
    "fused_causal": Case(FusedCausal, _qkv, 1),
    "fused_bool_mask": Case(FusedBoolMask, lambda: _qkv() + (_keep(),), 1),
    "fused_gqa": Case(FusedGQA, lambda: (torch.randn(B, H, S, D), torch.randn(B, 2, S, D),
                                         torch.randn(B, 2, S, D)), 1),
    "matmul_divide_padding": Case(MatmulDivide, lambda: _qkv() + (_padding(),), 1),
    "bmm_merged_heads": Case(BmmMergedHeads, _qkv, 1),
    "baddbmm_bias": Case(BaddbmmBias, lambda: _qkv() + (torch.randn(B * H, S, S),), 1),
    "einsum": Case(Einsum, _qkv, 1),
    "einsum_ellipsis": Case(EinsumEllipsis, _qkv, 1),
    "prescaled_query": Case(PreScaledQuery, _qkv, 1),
    "root_scale_both": Case(RootScaleBoth, _qkv, 1),
    "where_finfo_min": Case(WhereFinfoMin, lambda: _qkv() + (_keep(),), 1),
    "upcast_softmax": Case(UpcastSoftmax, _qkv, 1),
    "softmax_dtype": Case(SoftmaxDtype, _qkv, 1),
    "dropout_and_clone": Case(lambda: DropoutAndClone().eval(), _qkv, 1),
    "bshd_layout": Case(BSHDLayout, _x, 1),
    "gqa_repeat_interleave": Case(GQARepeatInterleave, _qkv, 1),
    "gqa_expand_reshape": Case(GQAExpandReshape, _qkv, 1),
    "alibi": Case(ALiBi, _qkv, 1),
    "relative_bias": Case(RelativeBias, _qkv, 1),
    "cross_attention": Case(CrossAttention, lambda: (torch.randn(B, H, S, D),
                                                     torch.randn(B, H, 2 * S, D),
                                                     torch.randn(B, H, 2 * S, D)), 1),
    "materialized_causal": Case(MaterializedCausal, _qkv, 1),
    "sliding_window": Case(SlidingWindow, _qkv, 1),
    "mha_need_weights": Case(lambda: MHANeedWeights(True).eval(), _x, 1),
    "mha_no_weights": Case(lambda: MHANeedWeights(False).eval(), _x, 1),
    "mha_key_padding": Case(lambda: MHAKeyPadding().eval(),
                            lambda: _x() + (_padding() == 0,), 1),
    "transformer_encoder": Case(
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 2 * E, batch_first=True),
                                      num_layers=2, enable_nested_tensor=False).eval(), _x, 2),
    "transformer_decoder": Case(
        lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 2 * E, batch_first=True),
                                      num_layers=1).eval(),
        lambda: (torch.randn(B, S, E), torch.randn(B, S + 2, E)), 2),
}

#: Expected mask kinds for cases that carry a mask.
MASK_KINDS = {
    "fused_causal": "causal",
    "matmul_divide_padding": "padding",
    "alibi": "additive",
    "relative_bias": "additive",
    "materialized_causal": "causal",
    "sliding_window": "window",
    "mha_key_padding": "padding",
}


class ProbabilitiesReturned(nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1)
        return probs @ v, probs


class SigmoidAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.sigmoid(q @ k.transpose(-2, -1) / math.sqrt(D)) @ v


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-2) @ v


class ProbabilitiesStored(nn.Module):
    """Probabilities reused: an entropy regularizer computed from them is returned."""

    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1)
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
        return probs @ v, entropy


NEGATIVES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "probabilities_returned": (ProbabilitiesReturned, "used outside the value product"),
    "probabilities_reused": (ProbabilitiesStored, "used outside the value product"),
    "sigmoid_attention": (SigmoidAttention, ""),
    "softmax_over_queries": (SoftmaxOverQueries, "not the key axis"),
}


class SoftCapped(nn.Module):
    """Gemma 2 style: scale, tanh soft-cap (2 here, 50 in Gemma 2), then the causal mask."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * D ** -0.5
        scores = torch.tanh(scores / 2.0) * 2.0
        causal = torch.full((S, S), float("-inf"), device=q.device).triu(1)
        return torch.softmax(scores + causal, dim=-1) @ v


ZOO["softcap"] = Case(SoftCapped, _qkv, 1)
MASK_KINDS["softcap"] = "causal"


class DiffusersBaddbmm(nn.Module):
    """diffusers' AttnProcessor: baddbmm into an uninitialized tensor with beta=0, alpha=scale."""

    def forward(self, q, k, v):
        q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
        empty = torch.empty(B * H, S, S, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=D ** -0.5)
        return torch.bmm(scores.softmax(dim=-1), v)


class NanoGPTCausal(nn.Module):
    """nanoGPT: a registered tril buffer sliced to the sequence, masked_fill where it is 0."""

    def __init__(self, block_size: int = 16):
        super().__init__()
        self.c_attn = nn.Linear(E, 3 * E)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(E, dim=2)
        k = k.view(b, t, H, c // H).transpose(1, 2)
        q = q.view(b, t, H, c // H).transpose(1, 2)
        v = v.view(b, t, H, c // H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return y.transpose(1, 2).contiguous().view(b, t, c)


ZOO["diffusers_baddbmm"] = Case(DiffusersBaddbmm, _qkv, 1)
ZOO["nanogpt_causal"] = Case(NanoGPTCausal, _x, 1)
MASK_KINDS["nanogpt_causal"] = "causal"


class EinsumBSHD(nn.Module):
    """Operands kept in (B, S, H, D); the einsums name the layout."""

    def forward(self, q, k, v):
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


ZOO["einsum_bshd"] = Case(EinsumBSHD, _qkv, 1)


class FairseqViews(nn.Module):
    """fairseq / transformers<4.48 BART: bmm on (B·H, S, D), the scores viewed to (B, H, S, S)
    to add the padding mask, viewed back, softmax, bmm."""

    def forward(self, q, k, v, attention_mask):
        bsz, heads, tgt_len, head_dim = q.shape
        q, k, v = (t.reshape(bsz * heads, -1, head_dim) for t in (q, k, v))
        weights = torch.bmm(q * head_dim ** -0.5, k.transpose(1, 2))
        src_len = weights.size(-1)
        mask = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        weights = weights.view(bsz, heads, tgt_len, src_len) + mask
        weights = weights.view(bsz * heads, tgt_len, src_len)
        out = torch.bmm(F.softmax(weights, dim=-1), v)
        return out.view(bsz, heads, tgt_len, head_dim)


ZOO["fairseq_views"] = Case(FairseqViews, lambda: _qkv() + (_padding(),), 1)
MASK_KINDS["fairseq_views"] = "padding"


class GroupedHeadsBroadcast(nn.Module):
    """GQA as a broadcast, no repetition: queries (B, Hkv, G, S, D), keys (B, Hkv, 1, S, D)."""

    def forward(self, q, k, v):
        kv_heads = 2
        q5 = q.view(B, kv_heads, H // kv_heads, S, D)
        k5, v5 = k[:, :kv_heads].unsqueeze(2), v[:, :kv_heads].unsqueeze(2)
        causal = torch.full((S, S), float("-inf"), device=q.device).triu(1)
        scores = q5 @ k5.transpose(-2, -1) / math.sqrt(D) + causal
        return (scores.softmax(-1) @ v5).reshape(B, H, S, D)


ZOO["gqa_grouped_broadcast"] = Case(GroupedHeadsBroadcast, _qkv, 1)
MASK_KINDS["gqa_grouped_broadcast"] = "causal"


class BloomViews(nn.Module):
    """BLOOM: baddbmm of a (B·H, 1, S) key bias into (B·H, S, S) scores, viewed to
    (B, H, S, S) to add the mask; the probabilities (not the scores) viewed back for the bmm."""

    def forward(self, q, k, v, key_bias, attention_mask):
        q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
        scores = key_bias.baddbmm(q, k.transpose(-1, -2), beta=0.5, alpha=D ** -0.5)
        mask = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        probs = F.softmax(scores.view(B, H, S, S) + mask, dim=-1, dtype=torch.float32)
        return torch.bmm(probs.view(B * H, S, S), v)


class InPlaceScale(nn.Module):
    """Falcon's ALiBi path: the bias added, then the scores scaled in place (`aten.mul_`);
    the probabilities viewed to the shape they already have."""

    def forward(self, q, k, v, key_bias):
        logits = q @ k.transpose(-1, -2) + key_bias.view(B, H, 1, S)
        logits *= D ** -0.5
        probs = F.softmax(logits, dim=-1)
        return (probs.view(B, H, S, S) @ v).flatten(0, 1)


ZOO["bloom_views"] = Case(BloomViews, lambda: _qkv() + (torch.randn(B * H, 1, S),
                                                        _padding()), 1)
MASK_KINDS["bloom_views"] = "additive"
ZOO["inplace_scale"] = Case(InPlaceScale, lambda: _qkv() + (torch.randn(B * H, 1, S),), 1)
MASK_KINDS["inplace_scale"] = "additive"


class InPlaceScaleObserved(nn.Module):
    """The scores scaled in place after they were returned: the mutation is observable, so the
    op stays as written and the softmax is left alone."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        raw = scores.view(B, H, S, S)
        scores *= D ** -0.5
        return F.softmax(scores, dim=-1) @ v, raw


NEGATIVES["inplace_scale_observed"] = (InPlaceScaleObserved, "mul_")


class FlooredViews(nn.Module):
    """XGLM: bmm on (B·H, S, D), the scores viewed to (B, H, S, S) for the mask, floored at
    finfo.min (`torch.max`), viewed back; after softmax viewed to 4-d and back once more."""

    def forward(self, q, k, v, attention_mask):
        q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
        weights = torch.bmm(q * D ** -0.5, k.transpose(1, 2))
        mask = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        weights = weights.view(B, H, S, S) + mask
        weights = torch.max(weights, torch.full((), torch.finfo(weights.dtype).min))
        probs = F.softmax(weights.view(B * H, S, S), dim=-1)
        probs = probs.view(B, H, S, S).view(B * H, S, S)
        return torch.bmm(probs, v).view(B, H, S, D)


ZOO["floored_views"] = Case(FlooredViews, lambda: _qkv() + (_padding(),), 1)
MASK_KINDS["floored_views"] = "padding"


class FlooredAtZero(nn.Module):
    """Scores clamped at 0: that changes unmasked scores, so it is not attention as written."""

    def forward(self, q, k, v):
        scores = torch.clamp_min(q @ k.transpose(-1, -2) * D ** -0.5, 0.0)
        return F.softmax(scores, dim=-1) @ v


NEGATIVES["floored_at_zero"] = (FlooredAtZero, "clamped from below")


class ZeroLearnedBias(nn.Module):
    """A learned per-head bias table, zero as initialized (BEiT, Swin): a constant mask of zeros
    at the example, but a parameter; it must stay a mask so fine-tuning can move it."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(H, S, S))

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.table)


ZOO["zero_learned_bias"] = Case(ZeroLearnedBias, _qkv, 1)
MASK_KINDS["zero_learned_bias"] = "additive"


class CausalFromParameterShape(nn.Module):
    """A causal mask shaped like a parameter (`full_like(param, -inf).triu(1)`): it reads the
    parameter's shape only, so it is still a constant causal mask."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(S, S))

    def forward(self, q, k, v):
        causal = torch.full_like(self.positions, float("-inf")).triu(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)


ZOO["causal_from_parameter_shape"] = Case(CausalFromParameterShape, _qkv, 1)
MASK_KINDS["causal_from_parameter_shape"] = "causal"
