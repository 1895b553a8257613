"""Pass: evaluate each site's mask on the examples, name its kind, and describe the site.

Runs after detection. One run of the graph on the examples gives every mask term's value;
`build_mask` combines them as canonicalization will, and `classify_mask` names the result.
A mask that depends on no graph input and looks causal (or empty) at the example length is
probed once more at a long length (when the sequence is dynamic), so a sliding window wider
than the example is not mistaken for plain causal masking. So is an input-dependent one that
stays causal (below), with its mask-like inputs all on and then drawn at random.

A mask that depends on inputs and looks causal at the example (a Hugging Face decoder's
causal mask with its attention_mask's padding) is causal for those inputs only. It is
re-evaluated with its mask-like inputs drawn at random (0/1 integer or boolean inputs, 0/-inf
float ones) a few times; only a producer that stays on or below the diagonal every time counts
as causal by construction, which lets canonicalization keep the mask *and* mark the call
causal (the kernel then skips the blocks above the diagonal). A prefix-LM mask that lets a
token_type_ids prefix see ahead is caught this way. A sliding window (Mistral, Gemma) is held
to the same test: only a producer that stays within its window every time is a window by
construction, which gives the call a window band as well.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from attnopt.passes.describe import describe_site
from attnopt.passes.evaluate import evaluate_subgraph, placeholder_values
from attnopt.passes.fx_utils import (
    ancestors, concrete, dtype_of, is_symbolic, module_path, value_ancestors, value_sources,
)
from attnopt.passes.manager import PassContext, PassResult
from attnopt.passes.masks import (
    CAUSAL_KINDS, MASKED_THRESHOLD, MaskInfo, build_mask, classify_mask, eager_emit,
    outside_band,
)

#: Sequence length at which input-independent masks are re-checked when the length is dynamic:
#: just above the widest common sliding window (4096: Mistral, Gemma 2). A wider window that
#: looks causal at this length would be missed; the probe costs O(PROBE_LENGTH²) mask elements.
PROBE_LENGTH = 4100
#: randomized evaluations an input-dependent causal-looking mask must stay causal through
CAUSAL_PROBES = 3


class ClassifyMasks:
    name = "classify_masks"

    def __call__(self, graph_module: GraphModule, context: PassContext) -> PassResult:
        term_nodes = list({t.node: None for m in context.matches for t in m.mask_terms})
        inputs = placeholder_values(graph_module, context.args, context.kwargs)
        values = {node.name: value.cpu() if isinstance(value, torch.Tensor) else value
                  for node, value in zip(term_nodes, evaluate_subgraph(
                      graph_module, term_nodes, inputs))}  # classified on the CPU
        names: dict[str, int] = {}
        changes = []
        self._probes: dict = {}  # mask producers are shared across layers: probe each once
        for index, match in enumerate(context.matches):
            info = self._classify(graph_module, match, values, inputs)
            context.mask_infos[index] = info
            path, module_type = module_path(match.anchor)
            qualified = ".".join(p for p in (context.name_prefix, path) if p) or "<root>"
            names[qualified] = names.get(qualified, 0) + 1
            name = qualified if names[qualified] == 1 else f"{qualified}#{names[qualified]}"
            site = describe_site(match, name=name, module=qualified, module_type=module_type,
                                 mask_kind=info.kind, window=info.window,
                                 causal=info.kind in CAUSAL_KINDS,
                                 alibi=info.alibi_slopes is not None)
            context.sites.append(site)
            changes.append(f"{name}: mask {info.kind}"
                           + (f" (window {info.window})" if info.window else "")
                           + (" with ALiBi" if info.alibi_slopes else "")
                           + (" [constant]" if info.constant and match.mask_terms else ""))
        return PassResult(graph_module, False, changes)

    def _classify(self, graph_module: GraphModule, match, values, inputs) -> MaskInfo:
        q_shape, k_shape = match.q.shape, match.k.shape
        q_len, kv_len = concrete(q_shape[2]), concrete(k_shape[2])
        dtype = dtype_of(match.q.node) or torch.float32
        if not match.mask_terms:
            return classify_mask(None, is_causal=match.is_causal, q_len=q_len, kv_len=kv_len,
                                 depends_on_input=False, depends_on_data=False)
        term_nodes = [t.node for t in match.mask_terms]
        sources = value_sources(term_nodes)
        float_sources = [n for n in sources if _is_float(n)]
        # a float input that is itself a mask (0 / very negative) is an input mask, not data
        depends_on_data = any(not _is_mask_input(inputs.get(n.name)) for n in float_sources)
        depends_on_input = len(sources) > 0
        mask = build_mask(match.mask_terms, [values[n.name] for n in term_nodes],
                          torch.zeros((), dtype=dtype), dtype, eager_emit)
        info = classify_mask(mask, is_causal=match.is_causal, q_len=q_len, kv_len=kv_len,
                             depends_on_input=depends_on_input, depends_on_data=depends_on_data)
        if info.constant and mask.is_floating_point() and \
                reads_trainable_parameter(graph_module, term_nodes):
            # a learned bias (BEiT's, T5's relative position table) is a fact of the weights
            # only until they are trained: a zero-initialized table would otherwise be dropped
            # as "none", and fine-tuning through the rewrite would never move it
            return MaskInfo("additive", constant=False)
        if not info.constant and info.kind in CAUSAL_KINDS and not match.is_causal:
            info = self._by_construction(graph_module, match, info, sources, inputs, dtype)
        if info.constant and info.kind in ("none", "causal", "window"):
            info = self._constant_at_length(graph_module, match, info, dtype)
        return info

    def _by_construction(self, graph_module, match, info: MaskInfo, sources, inputs,
                         dtype) -> MaskInfo:
        """An input-dependent mask that looks causal (or a window) at the example: whether it
        is one for every input (randomized re-runs), and a window wider than a dynamic
        example found at PROBE_LENGTH."""
        term_names = tuple(t.node.name for t in match.mask_terms)
        q_len, kv_len = concrete(match.q.shape[2]), concrete(match.k.shape[2])
        key = ("causal", term_names, q_len, kv_len, info.window)
        if key not in self._probes:  # layers share their mask producer: once per producer
            self._probes[key] = self._band_when_randomized(
                graph_module, match, sources, inputs, dtype, q_len, kv_len, info.window)
        causal, windowed = self._probes[key]
        info = replace(info, causal_by_construction=causal, window_by_construction=windowed)
        symbolic = _symbolic_lengths(match)
        if causal and info.window is None and symbolic:
            key = ("window at length", term_names)
            if key not in self._probes:
                self._probes[key] = self._window_at_length(
                    graph_module, match, sources, inputs, symbolic, dtype)
            window = self._probes[key]
            if window is not None:
                kind = "window+padding" if info.kind == "causal+padding" else "window"
                info = replace(info, kind=kind, window=window, window_by_construction=True)
        return info

    def _constant_at_length(self, graph_module, match, info: MaskInfo, dtype) -> MaskInfo:
        """A constant none/causal/window mask of a dynamic-length site, re-classified at
        PROBE_LENGTH: kept as a tensor where the two disagree or the probe cannot run, except
        that a causal example under a window at length is that window."""
        symbolic = _symbolic_lengths(match)
        if not symbolic:
            return info
        key = (tuple(t.node.name for t in match.mask_terms), info.kind, match.is_causal)
        if key not in self._probes:
            self._probes[key] = self._probe(graph_module, match, symbolic, dtype)
        probed = self._probes[key]
        if probed is None:  # could not probe: keep the mask tensor
            return MaskInfo(info.kind, info.window, constant=False)
        if info.kind == "causal" and probed.kind == "window":
            return probed  # a window wider than the example: causal there, the window at length
        if (probed.kind, probed.window) != (info.kind, info.window):
            return MaskInfo(probed.kind, probed.window, constant=False)
        if not _same_slopes(probed.alibi_slopes, info.alibi_slopes):
            return MaskInfo("additive", constant=False)  # a bias that is ALiBi at one length only
        return info

    def _band_when_randomized(self, graph_module, match, sources, inputs, dtype, q_len: int,
                              kv_len: int, window: Optional[int]) -> tuple[bool, bool]:
        """(whether the mask stays on or below the causal diagonal, whether it also stays
        within `window` keys of it) with its mask-like inputs drawn at random, CAUSAL_PROBES
        times ((False, False) when it has no such input to vary)."""
        term_nodes = [t.node for t in match.mask_terms]
        generator = torch.Generator().manual_seed(0)
        varied = [n for n in sources if is_mask_like(inputs.get(n.name))]
        if not varied:
            return False, False
        windowed = window is not None
        for _ in range(CAUSAL_PROBES):
            probe_inputs = dict(inputs)
            for node in varied:
                probe_inputs[node.name] = _random_mask_like(inputs[node.name], generator)
            try:
                probed = evaluate_subgraph(graph_module, term_nodes, probe_inputs)
            except Exception:  # noqa: BLE001 - a producer that cannot be probed is not trusted
                return False, False
            mask = build_mask(match.mask_terms, [p.cpu() for p in probed],
                              torch.zeros((), dtype=dtype), dtype, eager_emit)
            above, past_window = outside_band(mask, q_len, kv_len, window)
            if above:
                return False, False
            windowed = windowed and not past_window
        return True, windowed

    def _probe(self, graph_module, match, symbolic_dims, dtype) -> Optional[MaskInfo]:
        """The mask producer re-evaluated and classified at PROBE_LENGTH (None: cannot)."""
        zeros = self._inputs_at_length(match, symbolic_dims, lambda node, empty: empty.zero_())
        mask = self._mask_at(graph_module, match, zeros, dtype)
        if mask is None:
            return None
        q_len, kv_len = self._lengths_at(match, symbolic_dims)
        return classify_mask(mask, is_causal=match.is_causal, q_len=q_len, kv_len=kv_len,
                             depends_on_input=False, depends_on_data=False)

    def _window_at_length(self, graph_module, match, sources, inputs, symbolic_dims,
                          dtype) -> Optional[int]:
        """The width of an input-dependent causal mask's window at PROBE_LENGTH, when it has
        one by construction: a window with every mask-like input all on (no padding), and
        inside that window with them drawn at random, CAUSAL_PROBES times. None otherwise."""
        mask_like = {n.name for n in sources if is_mask_like(inputs.get(n.name))}
        if not mask_like:
            return None
        q_len, kv_len = self._lengths_at(match, symbolic_dims)

        def all_on(node, empty):
            return empty.fill_(1) if node.name in mask_like and not empty.is_floating_point() \
                else empty.zero_()  # float mask-like inputs: 0 = attend
        mask = self._mask_at(graph_module, match,
                             self._inputs_at_length(match, symbolic_dims, all_on), dtype)
        if mask is None:
            return None
        info = classify_mask(mask, is_causal=False, q_len=q_len, kv_len=kv_len,
                             depends_on_input=True, depends_on_data=False)
        if info.kind not in ("window", "window+padding"):
            return None
        generator = torch.Generator().manual_seed(0)

        def random(node, empty):
            return _random_mask_like(empty, generator) if node.name in mask_like \
                else empty.zero_()
        for _ in range(CAUSAL_PROBES):
            mask = self._mask_at(graph_module, match,
                                 self._inputs_at_length(match, symbolic_dims, random), dtype)
            if mask is None or any(outside_band(mask, q_len, kv_len, info.window)):
                return None
        return info.window

    @staticmethod
    def _inputs_at_length(match, symbolic_dims, fill) -> Optional[dict]:
        """Values for the mask producer's placeholders with the site's dynamic lengths at
        PROBE_LENGTH (other dynamic dims, the batch: 1), each `fill(node, empty tensor)`."""
        exprs = {str(d.node.expr) for d in symbolic_dims}
        values = {}
        for node in ancestors([t.node for t in match.mask_terms]):
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return None
            shape = [(PROBE_LENGTH if str(d.node.expr) in exprs else 1) if is_symbolic(d)
                     else concrete(d) for d in val.shape]
            values[node.name] = fill(node, torch.empty(shape, dtype=val.dtype,
                                                       device=val.device))
        return values

    @staticmethod
    def _lengths_at(match, symbolic_dims) -> tuple[int, int]:
        exprs = {str(d.node.expr) for d in symbolic_dims}

        def length(dim) -> int:
            if is_symbolic(dim) and str(dim.node.expr) in exprs:
                return PROBE_LENGTH
            return concrete(dim)
        return length(match.q.shape[2]), length(match.k.shape[2])

    @staticmethod
    def _mask_at(graph_module, match, values: Optional[dict], dtype) -> Optional[torch.Tensor]:
        """The site's mask built from its producer evaluated on `values` (None: cannot)."""
        if values is None:
            return None
        term_nodes = [t.node for t in match.mask_terms]
        try:
            probed = [p.cpu() for p in evaluate_subgraph(graph_module, term_nodes, values)]
        except Exception:  # noqa: BLE001 - a producer that cannot be probed is not trusted
            return None
        return build_mask(match.mask_terms, probed, torch.zeros((), dtype=dtype), dtype,
                          eager_emit)


def reads_trainable_parameter(graph_module: GraphModule, nodes: list[Node]) -> bool:
    """Whether the values of `nodes` are computed from a parameter that requires grad (a
    mask built as `full_like(weight, -inf).triu(1)` reads only its shape)."""
    for node in value_ancestors(nodes):
        if node.op != "get_attr":
            continue
        try:
            parameter = graph_module.get_parameter(node.target)
        except AttributeError:  # a buffer or a constant
            continue
        if parameter.requires_grad:
            return True
    return False


def _same_slopes(a: Optional[tuple], b: Optional[tuple]) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * max(abs(x), abs(y), 1e-30)
                                    for x, y in zip(a, b))


def _symbolic_lengths(match) -> list:
    """The site's q and kv lengths that are symbolic (dynamic) in the captured graph."""
    return [d for d in (match.q.shape[2], match.k.shape[2]) if is_symbolic(d)]


def _is_mask_input(value) -> bool:
    """A float input whose example value holds only 0 and masked-out values."""
    if not isinstance(value, torch.Tensor):
        return False
    value = value.float()
    return bool(((value == 0) | (value <= MASKED_THRESHOLD)).all())


def is_mask_like(value) -> bool:
    """An input that is a mask itself: 0/1 integers or booleans, or a 0 / masked-out float."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return False
    if value.is_floating_point():
        return _is_mask_input(value)
    return bool(((value == 0) | (value == 1)).all())


def _random_mask_like(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh random mask of `value`'s shape, dtype and kind (about half the positions off)."""
    keep = torch.rand(value.shape, generator=generator) < 0.5
    if value.is_floating_point():
        masked = torch.finfo(value.dtype).min
        return torch.where(keep, 0.0, masked).to(device=value.device, dtype=value.dtype)
    return keep.to(device=value.device, dtype=value.dtype)


def _is_float(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()
