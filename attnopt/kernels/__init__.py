"""Generated Triton kernels: the lowering targets of attnopt's ops on CUDA.

- `flash.py` — the exact forward kernel, specialized per site (bands, masks, bias, ALiBi, GQA,
  block layouts, soft-cap) and `flash_attention`, the public entry with autograd;
- `flash_backward.py` — the backward (dq, dk, dv) in one launch;
- `decode.py` — split-KV (Flash-Decoding) for a few queries over a long KV cache;
- `favor.py` — fused FAVOR+ (non-causal Performer) without the (n × m) feature matrices;
- `tiles.py` — the score/mask semantics every kernel shares; `reference.py` — the same
  semantics written densely in torch; `layout.py` — block-sparse layouts; `params.py` — checked
  call arguments.

Importing this package needs Triton; on machines without it the ops fall back to PyTorch.
"""

from attnopt.kernels.flash import flash_attention
from attnopt.kernels.layout import BlockSparseLayout
from attnopt.kernels.reference import flash_attention_reference

__all__ = ["BlockSparseLayout", "flash_attention", "flash_attention_reference"]
