"""attnopt's custom ops: one module per attention variant.

Importing this package registers every op under the `torch.ops.attnopt` namespace, so graphs
that contain them (exported programs, saved `.pt2` files) load after `import attnopt`.

- `attention` — canonical exact attention (every site is canonicalized into it);
- `performer` — FAVOR+ random features (softmax or ReLU kernel), causal in prefix-sum form;
- `linear_attention` — φ = elu + 1;
- `sparse_attention` — exact attention restricted to a `SparsePattern` (window, dilated,
  strided, global, random, BigBird, block layouts);
- `performer_window` — exact inside a window, FAVOR+ outside, one normalizer;
- `topk_attention` — data-dependent top-k block selection, exact inside the selected blocks;
- `int8_qk_attention` — Q·Kᵀ on int8 q and smoothed k with per-block scales (SageAttention);
- `int8_linear` — a projection with int8 weights (weight-only or dynamic activations).
"""

import torch

from attnopt.ops.attention import attention, attention_reference
from attnopt.ops.int8 import int8_linear, int8_linear_reference
from attnopt.ops.hybrid import performer_window, performer_window_reference
from attnopt.ops.linear import linear_attention, linear_attention_reference
from attnopt.ops.performer import performer, performer_reference
from attnopt.ops.quantized import int8_qk_attention, int8_qk_reference
from attnopt.ops.sparse import sparse_attention, sparse_attention_reference
from attnopt.ops.sparsity import SparsePattern
from attnopt.ops.topk import topk_attention, topk_attention_reference

#: The canonical exact attention overload, as it appears as an fx node target.
ATTENTION_OP = torch.ops.attnopt.attention.default
#: The quantized projection overload (an fx node target).
INT8_LINEAR_OP = torch.ops.attnopt.int8_linear.default
#: The approximate ops' overloads (fx node targets), by rewrite name.
APPROXIMATE_OPS = {
    "performer": torch.ops.attnopt.performer.default,
    "linear": torch.ops.attnopt.linear_attention.default,
    "sparse": torch.ops.attnopt.sparse_attention.default,
    "hybrid": torch.ops.attnopt.performer_window.default,
    "topk": torch.ops.attnopt.topk_attention.default,
    "int8_qk": torch.ops.attnopt.int8_qk_attention.default,
}

__all__ = ["attention", "attention_reference", "performer", "performer_reference",
           "linear_attention", "linear_attention_reference", "sparse_attention",
           "sparse_attention_reference", "performer_window", "performer_window_reference",
           "topk_attention", "topk_attention_reference", "int8_qk_attention",
           "int8_qk_reference", "int8_linear", "int8_linear_reference",
           "SparsePattern", "ATTENTION_OP", "APPROXIMATE_OPS", "INT8_LINEAR_OP"]
