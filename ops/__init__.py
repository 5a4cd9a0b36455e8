"""gemkit kernels: quantized matmul, linear-RNN scans, block-sparse attention.

Each op is a package (``ops/<op>/``) with a pure-jnp reference (also the XLA
path), Pallas TPU and GPU kernels and an ``api`` that validates input and
dispatches on ``impl``. This package imports jax only.
"""
