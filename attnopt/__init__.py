"""attnopt: find every attention in a PyTorch model, rewrite it, verify it, ship it.

    import attnopt
    fast = attnopt.optimize(model, policy="exact", example_inputs=(x,))
    print(fast.report)

Importing attnopt registers its custom ops (`torch.ops.attnopt.*`).
"""

from attnopt import ops  # noqa: F401  (registers torch.ops.attnopt)
from attnopt.api import OptimizedModule, inspect, optimize
from attnopt.onnx_export import ExportResult, export_onnx
from attnopt.errors import AttnoptError, CaptureError, PassError, PolicyError, VerificationError
from attnopt.policy import PRESETS, ErrorBudget, Policy, Rule, SiteSelector, resolve_policy
from attnopt.report import Report, SiteRecord
from attnopt.site import MASK_KINDS, AttentionSite, Projection, Rejection

__version__ = "0.1.0"

__all__ = [
    "optimize", "inspect", "OptimizedModule", "export_onnx", "ExportResult", "Policy", "Rule", "SiteSelector", "ErrorBudget",
    "PRESETS", "resolve_policy", "Report", "SiteRecord", "AttentionSite", "Projection",
    "Rejection", "MASK_KINDS", "AttnoptError", "CaptureError", "PassError", "PolicyError",
    "VerificationError", "__version__",
]
