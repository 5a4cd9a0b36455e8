"""Numerical assertions shared by the tests (DESIGN.md "Tests and numerics")."""

import numpy as np

# ||out - ref|| / ||ref|| bounds by compute dtype.
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def rel_err(out, ref) -> float:
  """||out - ref|| / ||ref|| in float64; a non-finite output gives inf."""
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if out.shape != ref.shape:
    raise AssertionError(f"shape {out.shape} != reference shape {ref.shape}")
  if not np.all(np.isfinite(out)):
    return float("inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_rel_close(out, ref, tol: float, what: str = "output") -> None:
  """Fails unless rel_err(out, ref) <= tol (NaN never passes)."""
  err = rel_err(out, ref)
  if not err <= tol:
    raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}")
