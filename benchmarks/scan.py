"""Linear-RNN scans: chunked linear attention vs the sequential recurrence.

Sections (``--sections``, comma separated; default: the CPU ones on a CPU,
all of them on a GPU / TPU), each timed side by side in one process:

- ``chunked``: a training step's cost (forward + backward: gradients of a
  scalar loss sum(o * w) wrt q, k, v and log_decay) of
  ``chunked_linear_attention(impl="xla")`` against ``jax.grad`` through
  ``linear_attention_steps`` (one ``lax.scan`` step per token), at
  B=2, T=``--t`` (4096), H=4, K=V=128, for a per-head decay and a per-key
  (GLA) decay; the forward pass alone too.
- ``scaling``: the chunked XLA forward + backward at T = ``--scaling_t``
  (1K..16K); ms per 1K tokens should stay flat (linear in T).
- ``linear_scan``: the two XLA paths of ``linear_scan`` (sequential
  ``lax.scan`` and ``lax.associative_scan``), forward and forward + backward,
  at B=2, T=4096, D=1024 (this picks the CPU default of ``xla_method``).
- ``accel`` (GPU / TPU only; the Pallas kernels run in interpret mode on a
  CPU, which says nothing about speed): ``linear_scan`` at B=8, T=4096,
  D=2560, XLA vs the backend's Pallas kernel, in GB/s (a, b read, h written)
  and % of the measured copy bandwidth; ``chunked_linear_attention`` forward
  + backward at B=1, T=8192, H=16, K=V=128 (XLA and Pallas) vs
  ``jax.nn.dot_product_attention(is_causal=True)`` on the same q, k, v.
  ``--kernel=pallas_gpu`` runs it on a CPU too, the kernel interpreted, and
  ``--tiny`` shrinks its shapes (benchmarks/accel.sh ``--dry-run``: the
  accelerator's code path, not a timing). A row whose call raises (a kernel
  that fails to compile) is kept with the error.

Each row: median and min milliseconds over ``--iters`` calls after a
compile-and-warm-up call. Prints a table and writes JSON (default
``benchmarks/results/scan_<machine>.json``).

Example (see benchmarks/README.md for recorded numbers):

  python benchmarks/scan.py --sections=chunked,scaling,linear_scan
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top
from ops import scan  # noqa: E402  pylint: disable=g-import-not-at-top

CPU_SECTIONS = ("chunked", "scaling", "linear_scan")


def _attn_inputs(b, t, h, k, v, decay, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = (jax.random.normal(keys[0], (b, t, h, k)) * k**-0.5).astype(dtype)
  kk = (jax.random.normal(keys[1], (b, t, h, k)) * k**-0.5).astype(dtype)
  vv = jax.random.normal(keys[2], (b, t, h, v), dtype)
  g_shape = (b, t, h) if decay == "head" else (b, t, h, k)
  g = -jax.random.uniform(keys[3], g_shape, jnp.float32, 0.01, 0.5)
  w = jax.random.normal(keys[4], (b, t, h, v), jnp.float32)
  return q, kk, vv, g, w


def _train_step(attend):
  """jit(grad of sum(o * w) wrt q, k, v, log_decay)."""
  def loss(q, k, v, g, w):
    return jnp.sum(attend(q, k, v, g)[0].astype(jnp.float32) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _forward(attend):
  return jax.jit(lambda q, k, v, g, w: attend(q, k, v, g)[0])


def _chunked(impl="xla", chunk_size=64):
  return functools.partial(scan.chunked_linear_attention, impl=impl,
                           chunk_size=chunk_size)


def _sequential(q, k, v, g):
  return scan.linear_attention_steps(q, k, v, g)


def section_chunked(args, rows):
  for decay in ("head", "key"):
    x = _attn_inputs(2, args.t, 4, 128, 128, decay)
    base = None
    for name, attend in (("sequential lax.scan (autodiff)", _sequential),
                         ("chunked xla", _chunked())):
      fwd = common.time_ms(_forward(attend), *x, iters=args.iters)
      step = common.time_ms(_train_step(attend), *x, iters=args.iters)
      base = base or step[0]
      rows.append(dict(section="chunked", decay=decay, path=name, B=2,
                       T=args.t, H=4, K=128, V=128, fwd_ms=fwd[0],
                       fwd_min_ms=fwd[1], fwd_bwd_ms=step[0],
                       fwd_bwd_min_ms=step[1], speedup=base / step[0]))
      _print_row(rows[-1])


def section_scaling(args, rows):
  base = None
  for t in args.scaling_t:
    x = _attn_inputs(2, t, 4, 128, 128, "head")
    med, low = common.time_ms(_train_step(_chunked()), *x, iters=args.iters)
    base = base or med / t
    rows.append(dict(section="scaling", decay="head", path="chunked xla", B=2,
                     T=t, H=4, K=128, V=128, fwd_bwd_ms=med,
                     fwd_bwd_min_ms=low, ms_per_1k_tokens=1e3 * med / t,
                     relative_to_first=med / t / base))
    _print_row(rows[-1])


def _scan_inputs(b, t, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(1), 2)
  a = jax.random.uniform(keys[0], (b, t, d), dtype, 0.5, 1.0)
  return a, jax.random.normal(keys[1], (b, t, d), dtype)


def _scan_fns(**kw):
  fwd = jax.jit(lambda a, b: scan.linear_scan(a, b, **kw)[0])
  step = jax.jit(jax.grad(
      lambda a, b: jnp.sum(scan.linear_scan(a, b, **kw)[0].astype(jnp.float32)),
      argnums=(0, 1)))
  return fwd, step


def section_linear_scan(args, rows):
  a, b = _scan_inputs(2, 4096, 1024)
  for method in ("sequential", "associative"):
    fwd, step = _scan_fns(impl="xla", xla_method=method)
    f = common.time_ms(fwd, a, b, iters=args.iters)
    s = common.time_ms(step, a, b, iters=args.iters)
    rows.append(dict(section="linear_scan", path=f"xla {method}", B=2, T=4096,
                     D=1024, fwd_ms=f[0], fwd_min_ms=f[1], fwd_bwd_ms=s[0],
                     fwd_bwd_min_ms=s[1]))
    _print_row(rows[-1])


def measure_copy_gbps(iters: int, mbytes: int = 512) -> float:
  """GB/s of an out-of-place float32 x + 1 over ``mbytes`` MiB (read + write)."""
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  _, ms = common.time_ms(jax.jit(lambda x: x + 1), x, iters=max(5, iters))
  return 2 * x.nbytes / ms / 1e6


# accel shapes: linear_scan (B, T, D), chunked attention (B, T, H, K=V), copy MiB
ACCEL_SHAPES = {"full": ((8, 4096, 2560), (1, 8192, 16, 128), 512),
                "tiny": ((2, 64, 256), (1, 128, 2, 32), 8)}


def _error_row(row, e):
  row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return row


def section_accel(args, rows):
  kernel = args.kernel or common.KERNEL_IMPL[jax.default_backend()]
  (sb, st, sd), (ab, at, ah, ad), copy_mb = ACCEL_SHAPES["tiny" if args.tiny else "full"]
  peak = measure_copy_gbps(args.iters, copy_mb)
  a, b = _scan_inputs(sb, st, sd)
  moved = 3 * a.nbytes                                  # read a, b; write h
  for impl in ("xla", kernel):
    row = dict(section="accel", op="linear_scan", path=impl, B=sb, T=st, D=sd)
    try:
      fwd, step = _scan_fns(impl=impl)
      med, low = common.time_ms(fwd, a, b, iters=args.iters)
      gbps = moved / med / 1e6
      row.update(fwd_ms=med, fwd_min_ms=low, gbps=gbps, copy_gbps=peak,
                 pct_of_copy=100 * gbps / peak,
                 fwd_bwd_ms=common.time_ms(step, a, b, iters=args.iters)[0])
    except Exception as e:  # pylint: disable=broad-except
      _error_row(row, e)
    rows.append(row)
    _print_row(rows[-1])
  q, k, v, g, w = _attn_inputs(ab, at, ah, ad, ad, "head", jnp.bfloat16)

  def sdpa(q, k, v, g):
    del g
    return (jax.nn.dot_product_attention(q, k, v, is_causal=True),)

  base = None
  for name, attend in (("dot_product_attention causal", sdpa),
                       ("chunked xla", _chunked()),
                       (f"chunked {kernel}", _chunked(kernel))):
    row = dict(section="accel", op="chunked_linear_attention", path=name, B=ab,
               T=at, H=ah, K=ad, V=ad, dtype="bfloat16")
    try:
      med, low = common.time_ms(_train_step(attend), q, k, v, g, w, iters=args.iters)
      base = base or med
      row.update(fwd_bwd_ms=med, fwd_bwd_min_ms=low, speedup_vs_sdpa=base / med)
    except Exception as e:  # pylint: disable=broad-except
      _error_row(row, e)
    rows.append(row)
    _print_row(rows[-1])


SECTIONS = {"chunked": section_chunked, "scaling": section_scaling,
            "linear_scan": section_linear_scan, "accel": section_accel}


def _print_row(row):
  print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in row.items()), flush=True)


def print_tables(rows):
  """One fixed-width table per section (all the JSON columns)."""
  for section in dict.fromkeys(r["section"] for r in rows):
    part = [r for r in rows if r["section"] == section]
    cols = [c for c in dict.fromkeys(k for r in part for k in r) if c != "section"]
    cells = [[f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
              for c in cols] for r in part]
    widths = [max(len(c), *(len(row[i]) for row in cells))
              for i, c in enumerate(cols)]
    print(f"\n[{section}]")
    for line in [cols] + cells:
      print("  ".join(x.rjust(w) for x, w in zip(line, widths)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default=None,
                      help=f"comma list of {sorted(SECTIONS)}")
  parser.add_argument("--t", type=int, default=4096)
  parser.add_argument("--scaling_t", default="1024,2048,4096,8192,16384")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--kernel", default=None, choices=("pallas_gpu", "pallas_tpu"),
                      help="the kernel of section accel (default: the backend's); on a CPU "
                           "it runs interpreted: a dry run, not a timing")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny shapes in section accel (a dry run of its code path)")
  args = parser.parse_args(argv)
  args.scaling_t = [int(t) for t in args.scaling_t.split(",")]
  on_cpu = jax.default_backend() == "cpu"
  sections = (args.sections.split(",") if args.sections
              else list(CPU_SECTIONS) + ([] if on_cpu else ["accel"]))
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}")
  if "accel" in sections and on_cpu and not args.kernel:
    parser.error("section 'accel' needs a GPU or TPU backend (or --kernel, interpreted)")
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}")
  rows = []
  for name in sections:
    SECTIONS[name](args, rows)
  print_tables(rows)
  result = dict(jax=jax.__version__, backend=jax.default_backend(), kernel_interpreted=on_cpu,
                device_kind=jax.devices()[0].device_kind, command=" ".join(sys.argv), rows=rows)
  print(f"wrote {common.write_json(result, 'scan', args.out)}")


if __name__ == "__main__":
  main()
