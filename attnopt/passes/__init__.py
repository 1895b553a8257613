"""Graph passes over exported fx graphs: cleanup → detect → classify masks → canonicalize →
weight rewrites (prune heads, GQA) → approximate → select backends.

Each pass is a small named callable `(graph_module, context) -> PassResult`; `manager.py` runs
them. Matching lives beside the passes: `scores.py` (softmax input back to q·kᵀ), `operands.py`
(q, k, v and einsum layouts), `patterns.py` (what a match is), `masks.py` (mask building and
classification), `describe.py` (AttentionSite from a match), `evaluate.py` (running graphs on
values), `fx_utils.py` (node helpers), `heads.py` (rebuilding projections with other heads).
"""
