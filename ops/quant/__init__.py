"""Quantized matmul: weight formats, XLA path and Pallas TPU/GPU kernels.

>>> from ops import quant
>>> qw = quant.quantize(w, "int4", group_size=128)     # w [K, N]
>>> y = quant.quantized_matmul(x, qw)                   # x [..., K] -> [..., N]
"""

from ops.quant.api import BlockSizes, dequantize, quantize, quantized_matmul
from ops.quant.reference import ACT_FORMATS, FORMATS, QuantizedWeight

__all__ = ["ACT_FORMATS", "BlockSizes", "FORMATS", "QuantizedWeight", "dequantize",
           "quantize", "quantized_matmul"]
