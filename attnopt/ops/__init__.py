"""attnopt's custom ops: one module per attention variant.

Importing this package registers every op under the `torch.ops.attnopt` namespace, so graphs
that contain them (exported programs, saved `.pt2` files) load after `import attnopt`.
"""

import torch

from attnopt.ops.attention import attention, attention_reference

#: The canonical exact attention overload, as it appears as an fx node target.
ATTENTION_OP = torch.ops.attnopt.attention.default

__all__ = ["attention", "attention_reference", "ATTENTION_OP"]
