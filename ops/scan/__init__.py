"""Linear-RNN scans: diagonal scan, chunked (gated) linear attention, delta rule.

``linear_attention_steps`` and ``delta_rule_steps`` are the step-by-step
recurrences (the reference, no chunk padding): what a decoder runs for a
single token from a cached state.
"""

from ops.scan.api import (ChunkBlockSizes, ScanBlockSizes,
                          chunked_linear_attention, delta_rule, linear_scan)
from ops.scan.reference import delta_rule_steps, linear_attention_steps

__all__ = ["ChunkBlockSizes", "ScanBlockSizes", "chunked_linear_attention",
           "delta_rule", "delta_rule_steps", "linear_attention_steps", "linear_scan"]
