"""Quantized matmul: weight formats, XLA path and Pallas TPU/GPU kernels.

>>> from ops import quant
>>> qw = quant.quantize(w, "int4", group_size=128)     # w [K, N]
>>> y = quant.quantized_matmul(x, qw)                   # x [..., K] -> [..., N]
"""

from ops.quant.api import BlockSizes, dequantize, quantize, quantized_matmul
from ops.quant.reference import ACT_FORMATS, DEFAULT_GROUP_SIZE, FORMATS, QuantizedWeight

__all__ = ["ACT_FORMATS", "BlockSizes", "DEFAULT_GROUP_SIZE", "FORMATS", "QuantizedWeight",
           "dequantize", "quantize", "quantized_matmul"]
