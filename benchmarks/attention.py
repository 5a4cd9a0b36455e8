"""Block-sparse attention: sliding-window and full causal vs dense attention.

Sections (``--sections``, comma separated; default: the CPU ones on a CPU,
all of them on a GPU / TPU), each timed side by side in one process:

- ``window``: at T=``--t`` (8192), causal sliding window ``--window``
  (1024): ``block_sparse_attention(CausalMask() & LocalMask(w), impl="xla")``
  against dense causal ``jax.nn.dot_product_attention(is_causal=True)``
  (XLA), forward and forward + backward (grads of sum(o * w) wrt q, k, v).
- ``scaling``: the sliding-window XLA forward at T = ``--scaling_t``
  (2K..16K) with the window fixed; ms per 1K tokens should stay flat
  (linear in T), next to the dense causal forward where it fits.
- ``accel`` (GPU / TPU only; kernels on a CPU run only in interpret mode,
  which says nothing about speed): at T=``--accel_t`` (16K), bf16, the
  sliding-window pattern with the backend's Pallas kernel and with XLA,
  and the full causal mask with the Pallas kernel, against dense causal
  attention: cuDNN (``implementation="cudnn"``) on a GPU, XLA on a TPU.
  Forward and forward + backward. ``--kernel=pallas_gpu`` runs it on a CPU
  too, the kernel interpreted against dense XLA (benchmarks/accel.sh
  ``--dry-run``, with a small ``--accel_t``: the code path, not a timing).
  A row whose call raises (a kernel that fails to compile) is kept with the
  error.

Shapes: B=1, Hq=``--heads`` (8) with Hkv=``--kv_heads`` (8), D=``--head_dim``
(64 on CPU, 128 in ``accel``), block 128 x 128. Each row: median and min ms
over ``--iters`` calls after a compile-and-warm-up call; ``vs dense`` is the
dense median over this row's median, measured in the same run. Prints a
table and writes JSON (default ``benchmarks/results/attention_<machine>.json``).

Example (see benchmarks/README.md for recorded numbers):

  python benchmarks/attention.py --sections=window,scaling
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top
from ops import attention  # noqa: E402  pylint: disable=g-import-not-at-top

CPU_SECTIONS = ("window", "scaling")


def _inputs(args, t, d, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (1, t, args.heads, d), dtype)
  k, v = (jax.random.normal(kk, (1, t, args.kv_heads, d), dtype) for kk in keys[1:3])
  w = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, w


def _sparse(mask, impl):
  return lambda q, k, v: attention.block_sparse_attention(q, k, v, mask, impl=impl)


def _dense(implementation=None):
  def fn(q, k, v):
    if q.shape[2] != k.shape[2]:
      k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return fn


def _variants(fn, with_backward: bool):
  """{"fwd": jitted forward, "fwd+bwd": jitted grads of sum(o * w)} of ``fn(q, k, v)``."""
  out = {"fwd": jax.jit(lambda q, k, v, w: fn(q, k, v))}
  if with_backward:
    loss = lambda q, k, v, w: jnp.sum((fn(q, k, v) * w).astype(jnp.float32))
    out["fwd+bwd"] = jax.jit(jax.grad(loss, (0, 1, 2)))
  return out


def _compare(section, t, fns, inputs, args, rows, with_backward=True):
  """Times every ``fns`` entry (first one: the dense baseline) per pass."""
  for kind in ("fwd", "fwd+bwd") if with_backward else ("fwd",):
    base = None
    for name, fn in fns.items():
      if fn is None:
        continue
      try:
        med, low = common.time_ms(_variants(fn, with_backward)[kind], *inputs, iters=args.iters)
      except Exception as e:  # pylint: disable=broad-except  # e.g. a kernel that fails to compile
        row = dict(section=section, t=t, window=args.window, impl=name, pass_=kind,
                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
        print(f"{section:<13} {t:>6} {args.window:>6}  {name:<22} {kind:<8} {row['error']}",
              flush=True)
        continue
      base = med if base is None else base
      row = dict(section=section, t=t, window=args.window, impl=name, pass_=kind,
                 ms_median=med, ms_min=low, ms_per_1k_tokens=med / (t / 1024),
                 vs_dense=base / med)
      rows.append(row)
      _print_row(row)


def section_window(args, rows):
  d = args.head_dim or 64
  inputs = _inputs(args, args.t, d, jnp.float32)
  mask = attention.CausalMask() & attention.LocalMask(args.window)
  _compare("window", args.t, {"dense causal (xla)": _dense(), "sparse xla": _sparse(mask, "xla")},
           inputs, args, rows)


def section_scaling(args, rows):
  d = args.head_dim or 64
  mask = attention.CausalMask() & attention.LocalMask(args.window)
  for t in args.scaling_t:
    inputs = _inputs(args, t, d, jnp.float32)
    fns = {"dense causal (xla)": _dense() if t <= args.dense_max_t else None,
           "sparse xla": _sparse(mask, "xla")}
    _compare("scaling", t, fns, inputs, args, rows, with_backward=False)


def section_accel(args, rows):
  backend = jax.default_backend()
  if backend not in common.KERNEL_IMPL and not args.kernel:
    print(f"# accel: skipped on {backend} (kernels would run in interpret mode)")
    return
  kernel = args.kernel or common.KERNEL_IMPL[backend]
  d = args.head_dim or 128
  inputs = _inputs(args, args.accel_t, d, jnp.bfloat16)
  window = attention.CausalMask() & attention.LocalMask(args.window)
  dense_name = "dense causal (cudnn)" if backend == "gpu" else "dense causal (xla)"
  dense = _dense("cudnn" if backend == "gpu" else None)
  _compare("accel-window", args.accel_t,
           {dense_name: dense, f"sparse {kernel}": _sparse(window, kernel),
            "sparse xla": _sparse(window, "xla")}, inputs, args, rows)
  _compare("accel-causal", args.accel_t,
           {dense_name: dense, f"causal {kernel}": _sparse(attention.CausalMask(), kernel)},
           inputs, args, rows)


SECTIONS = {"window": section_window, "scaling": section_scaling, "accel": section_accel}


def _print_row(row):
  print(f"{row['section']:<13} {row['t']:>6} {row['window']:>6}  {row['impl']:<22} "
        f"{row['pass_']:<8} {row['ms_median']:>10.1f} {row['ms_min']:>10.1f} "
        f"{row['ms_per_1k_tokens']:>10.2f} {row['vs_dense']:>8.2f}x", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default=None, help=f"comma list of {sorted(SECTIONS)}")
  parser.add_argument("--t", type=int, default=8192)
  parser.add_argument("--window", type=int, default=1024)
  parser.add_argument("--scaling_t", type=lambda s: [int(x) for x in s.split(",")],
                      default=[2048, 4096, 8192, 16384])
  parser.add_argument("--dense_max_t", type=int, default=8192,
                      help="largest T at which the dense baseline runs in 'scaling'")
  parser.add_argument("--accel_t", type=int, default=16384)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=None)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--kernel", default=None, choices=("pallas_gpu", "pallas_tpu"),
                      help="the kernel of section accel (default: the backend's); on a CPU "
                           "it runs interpreted: a dry run, not a timing")
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  sections = (args.sections.split(",") if args.sections
              else list(CPU_SECTIONS) if on_cpu else list(SECTIONS))
  for s in sections:
    if s not in SECTIONS:
      parser.error(f"unknown section {s!r}; choose from {sorted(SECTIONS)}")

  machine = common.machine()
  print(f"# {machine} ({jax.default_backend()}), jax {jax.__version__}, "
        f"B=1 Hq={args.heads} Hkv={args.kv_heads}, load average "
        f"{os.getloadavg()[0]:.1f} at start")
  print(f"{'section':<13} {'T':>6} {'window':>6}  {'impl':<22} {'pass':<8} {'ms(med)':>10} "
        f"{'ms(min)':>10} {'ms/1Ktok':>10} {'vs dense':>9}")
  rows = []
  for s in sections:
    SECTIONS[s](args, rows)
  meta = dict(machine=machine, backend=jax.default_backend(), jax=jax.__version__,
              device_kind=jax.devices()[0].device_kind, kernel_interpreted=on_cpu,
              argv=sys.argv[1:], load_average_end=os.getloadavg()[0])
  print(f"# wrote {common.write_json(dict(meta=meta, rows=rows), 'attention', args.out)}")


if __name__ == "__main__":
  main()
