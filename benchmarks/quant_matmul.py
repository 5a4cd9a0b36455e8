"""Quantized matmul: bf16 dot vs XLA dequantize-then-dot vs the Pallas kernel.

For each M and weight format, times ``y = x @ W`` (x bf16 [M, K], W [K, N])
three ways, side by side in one process:

- ``bf16``: ``jnp.dot`` with a bfloat16 W (the baseline),
- ``xla``: ``quantized_matmul(..., impl="xla")``, which dequantizes W with
  XLA and then runs the dot,
- ``pallas``: the Pallas kernel of this backend (``pallas_gpu`` on GPU,
  ``pallas_tpu`` on TPU), which dequantizes inside the kernel.

Reported per row: median and min milliseconds over ``--iters`` runs after a
compile-and-warm-up call; from the median: effective GB/s = (bytes of stored
W + x + y) / time, its percentage of ``--peak_gbps`` (a number, or
``measure``: the read GB/s of a float32 sum over 256 MiB in this process),
and the speedup over the bf16 dot; and the relative error of the output
against ``x @ dequantize(W)`` in float32.

On a CPU the kernels only run in interpret mode, which says nothing about
speed: they are not timed; ``--kernel_check`` (default on) runs each kernel
once in interpret mode at a small size and reports its error instead.
``--kernel=pallas_gpu`` on a CPU times that kernel interpreted all the same
(benchmarks/accel.sh ``--dry-run`` does, to go through the accelerator's code
path; such times mean nothing). A row whose call raises is kept with the
error, so one kernel that fails to compile leaves the other rows.

Example (see benchmarks/README.md for recorded numbers):

  python benchmarks/quant_matmul.py --m=1,8,32,128,1024 --k=4096 --n=4096 --peak_gbps=3350
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top
from ops import quant  # noqa: E402  pylint: disable=g-import-not-at-top

# name -> (fmt, quantize kwargs, act_fmt)
FORMATS = {
    "int8": ("int8", {}, None),
    "int4-g128": ("int4", dict(group_size=128), None),
    "int4-g128-asym": ("int4", dict(group_size=128, symmetric=False), None),
    "nf4-g64": ("nf4", dict(group_size=64), None),
    "nf4-g64-dq": ("nf4", dict(group_size=64, double_quant=True), None),
    "fp4-g64": ("fp4", dict(group_size=64), None),
    "fp8": ("fp8", {}, None),
    "ternary": ("ternary", {}, None),
    "w8a8-int8": ("int8", {}, "int8"),
    "w8a8-fp8": ("fp8", {}, "fp8"),
}


def measure_peak_gbps(iters: int, mbytes: int = 256) -> float:
  """Effective read GB/s of a float32 sum over a ``mbytes`` MiB array.

  A read-only stream, like a weight-bound matmul; an out-of-place copy would
  also count first-touch page faults of its fresh output on a CPU.
  """
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  _, ms = common.time_ms(jax.jit(jnp.sum), x, iters=max(5, iters))
  return x.nbytes / ms / 1e6


def _rel_err(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def _no_kernel(e: ValueError) -> str:
  return "no kernel: " + str(e).split("cannot run this call: ")[-1]


def kernel_check(names, kernel: str, size: int) -> list[dict]:
  """Each kernel once, interpret mode on CPU, vs float32 x @ dequantize(W)."""
  rows = []
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((size, size)) * 0.05, jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, size)), jnp.bfloat16)
  for name in names:
    fmt, kw, act = FORMATS[name]
    qw = quant.quantize(w, fmt, **kw)
    ref = quant.quantized_matmul(x.astype(jnp.float32), qw, act_fmt=act, impl="xla")
    try:
      y = quant.quantized_matmul(x, qw, act_fmt=act, impl=kernel)
      rows.append(dict(format=name, impl=kernel, m=3, k=size, n=size, rel_err=_rel_err(y, ref),
                       note="interpret mode, not timed"))
    except ValueError as e:
      rows.append(dict(format=name, impl=kernel, note=_no_kernel(e)))
  return rows


def run(args) -> dict:
  backend = jax.default_backend()
  kernel = args.kernel or common.KERNEL_IMPL.get(backend)
  names = args.formats.split(",")
  k, n = args.k, args.n
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
  w_bf16 = w.astype(jnp.bfloat16)
  qws = {name: quant.quantize(w, FORMATS[name][0], **FORMATS[name][1]) for name in names}
  peak = measure_peak_gbps(args.iters) if args.peak_gbps == "measure" else (
      float(args.peak_gbps) if args.peak_gbps else None)
  dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
  rows = []
  for m in [int(v) for v in args.m.split(",")]:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    io_bytes = 2 * (m * k + m * n)
    base_ms, base_min = common.time_ms(dot, x, w_bf16, iters=args.iters)

    def row(name, impl, times, w_bytes, err):
      ms, ms_min = times
      gbps = (w_bytes + io_bytes) / ms / 1e6
      rows.append(dict(m=m, k=k, n=n, format=name, impl=impl, ms=ms, ms_min=ms_min, gbps=gbps,
                       pct_peak=None if peak is None else 100 * gbps / peak,
                       speedup_vs_bf16=base_ms / ms, rel_err=err))

    row("bf16", "jnp.dot", (base_ms, base_min), k * n * 2, 0.0)
    for name in names:
      _, _, act = FORMATS[name]
      qw = qws[name]
      ref = np.asarray(x, np.float32) @ np.asarray(quant.dequantize(qw))
      impls = ["xla"] + ([kernel] if kernel and (backend != "cpu" or args.kernel) else [])
      for impl in impls:
        fn = jax.jit(lambda x, q, impl=impl, act=act: quant.quantized_matmul(
            x, q, act_fmt=act, impl=impl))
        try:
          times = common.time_ms(fn, x, qw, iters=args.iters)
        except ValueError as e:  # no kernel for this format
          rows.append(dict(m=m, k=k, n=n, format=name, impl=impl,
                           note=_no_kernel(e)))
          continue
        except Exception as e:  # pylint: disable=broad-except  # e.g. a kernel that fails to compile
          rows.append(dict(m=m, k=k, n=n, format=name, impl=impl,
                           note=f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
          continue
        row(name, impl, times, qw.nbytes, _rel_err(fn(x, qw), ref))
  checks = []
  if backend == "cpu" and args.kernel_check:
    for kern in ("pallas_tpu", "pallas_gpu"):
      checks += kernel_check(names, kern, args.kernel_check_size)
  return dict(
      benchmark="quant_matmul", machine=common.machine(), backend=backend,
      device_kind=jax.devices()[0].device_kind, jax_version=jax.__version__,
      kernel=kernel, kernel_interpreted=backend == "cpu",
      cpu_count=os.cpu_count(), load_avg_1min_at_end=os.getloadavg()[0], peak_gbps=peak, peak_source=args.peak_gbps,
      command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
      rows=rows, kernel_checks=checks)


def print_table(result: dict) -> None:
  peak = result["peak_gbps"]
  peak = "n/a" if peak is None else f"{peak:.1f} GB/s ({result['peak_source']})"
  print(f"# {result['machine']} ({result['device_kind']}), jax {result['jax_version']}, peak {peak}")
  if result["kernel_interpreted"] and any(r["impl"] == result["kernel"] for r in result["rows"]):
    print(f"# {result['kernel']} ran INTERPRETED on {result['backend']}: its rows time nothing")
  print(f"{'M':>5} {'K':>5} {'N':>5}  {'format':<15} {'impl':<11} {'ms(med)':>9} {'ms(min)':>9} "
        f"{'GB/s':>8} {'%peak':>6} {'vs bf16':>8} {'rel_err':>8}")
  for r in result["rows"]:
    if "note" in r:
      print(f"{r['m']:>5} {r['k']:>5} {r['n']:>5}  {r['format']:<15} {r['impl']:<11} {r['note']}")
      continue
    pct = "" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}"
    print(f"{r['m']:>5} {r['k']:>5} {r['n']:>5}  {r['format']:<15} {r['impl']:<11} "
          f"{r['ms']:>9.3f} {r['ms_min']:>9.3f} {r['gbps']:>8.2f} {pct:>6} {r['speedup_vs_bf16']:>7.2f}x "
          f"{r['rel_err']:>8.1e}")
  if result["kernel_checks"]:
    print("\n# kernels on CPU: interpret mode, correctness only (not timed)")
    for r in result["kernel_checks"]:
      err = f"rel_err {r['rel_err']:.1e}" if "rel_err" in r else ""
      print(f"  {r['format']:<15} {r['impl']:<11} {err} {r['note']}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--m", default="1,8,32,128,1024", help="comma-separated M values")
  p.add_argument("--k", type=int, default=4096)
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--peak_gbps", default="measure",
                 help="peak memory bandwidth in GB/s for %%peak, 'measure', or '' for none")
  p.add_argument("--kernel_check", type=int, default=1,
                 help="on CPU: run each kernel once in interpret mode (correctness only)")
  p.add_argument("--kernel_check_size", type=int, default=256)
  p.add_argument("--kernel", default=None, choices=("pallas_gpu", "pallas_tpu"),
                 help="the kernel timed beside XLA (default: the backend's; on a CPU none, "
                      "and a kernel named here runs interpreted: a dry run, not a timing)")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/quant_matmul_<machine>.json)")
  args = p.parse_args(argv)
  unknown = set(args.formats.split(",")) - set(FORMATS)
  if unknown:
    p.error(f"unknown formats {sorted(unknown)}; choose from {list(FORMATS)}")
  result = run(args)
  print_table(result)
  print(f"\nwrote {common.write_json(result, 'quant_matmul', args.out)}")


if __name__ == "__main__":
  main()
