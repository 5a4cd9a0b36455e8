"""Linear-RNN scans: diagonal scan, chunked (gated) linear attention, delta rule."""

from ops.scan.api import (ChunkBlockSizes, ScanBlockSizes,
                          chunked_linear_attention, delta_rule, linear_scan)

__all__ = ["ChunkBlockSizes", "ScanBlockSizes", "chunked_linear_attention",
           "delta_rule", "linear_scan"]
