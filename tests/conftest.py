"""Shared pytest setup: TPU-interpret hygiene, and which kernel tests run where.

Kernel families. A test that runs a Pallas kernel carries the marker
``pallas_tpu`` or ``pallas_gpu`` (or both). A parameter whose value is the
string ``"pallas_tpu"`` / ``"pallas_gpu"`` (``impl``, ``path``) marks its case
by itself; any other test writes the marker out. In tests/ops a kernel that
runs interpreted inside a test without its family's marker fails that test,
so ``-m pallas_gpu`` selects every GPU kernel test. (A cross-lowering runs
nothing and needs no marker; an ``impl`` parameter marks it all the same.)

On CPU every kernel runs in interpret mode (ops.config). On a GPU or TPU
(``GEMKIT_INTERPRET=0``, as benchmarks/accel.sh runs them, or unset) they
compile for the device instead, and:

- a test of the other family is skipped with the reason (``pallas_tpu``
  tests on a GPU: Mosaic TPU kernels compile only for a TPU);
- ``jax_default_matmul_precision`` is ``"highest"``, so float32 dots in the
  kernels (Triton's default is TF32) and in the references are true float32
  and the float32 tolerances measure the kernels, not TF32 rounding;
- a kernel of the device's family that still runs interpreted fails.

``--kernel-target=gpu`` (or ``tpu``) on a CPU selects and skips as the device
run would while the kernels stay interpreted: accel.sh's ``--dry-run``.

A GPU kernel is never given ``interpret=True`` by a test (that would keep it
interpreted on the device): tests leave ``interpret`` at None and ops.config
decides. TPU kernels may get ``pltpu.InterpretParams`` (race detection).
"""

import json
import pathlib

import pytest

FAMILIES = ("pallas_tpu", "pallas_gpu")
_OPS_TESTS = pathlib.Path(__file__).parent / "ops"
_CONFIG = []   # the pytest config, for the report hooks


def pytest_addoption(parser):
  parser.addoption(
      "--kernel-target", choices=("gpu", "tpu"), default=None,
      help="run and skip kernel tests as on this device (default: the backend where "
           "kernels compile, else every family); kernels stay interpreted on a CPU")
  parser.addoption(
      "--report-jsonl", default=None, metavar="PATH",
      help="append one JSON line per test outcome (and collection error) to PATH as the "
           "run goes, so that a run stopped at a time limit still reports (benchmarks/accel.py)")


def _report_line(config, **record):
  path = config.getoption("--report-jsonl")
  if path and not hasattr(config, "workerinput"):   # pytest-xdist: the controller writes
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _message(report) -> str:
  if report.skipped and isinstance(report.longrepr, tuple):
    return str(report.longrepr[2])
  return str(report.longrepr or "")[-2000:]


def pytest_runtest_logreport(report):
  if report.when == "call" or not report.passed:
    _report_line(_CONFIG[0], nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                 seconds=round(report.duration, 3),
                 message="" if report.passed else _message(report))


def pytest_collectreport(report):
  if report.failed and _CONFIG:
    _report_line(_CONFIG[0], nodeid=report.nodeid, when="collect", outcome="error",
                 seconds=0.0, message=_message(report))


def _compiled(config) -> bool:
  return config._gemkit_compiled  # pylint: disable=protected-access


def _target(config):
  return config._gemkit_kernel_target  # pylint: disable=protected-access


def pytest_configure(config):
  _CONFIG[:] = [config]
  for family in FAMILIES:
    config.addinivalue_line(
        "markers", f"{family}: runs a {family} kernel (skipped where another kernel family "
                   "compiles: see tests/conftest.py)")
  import jax  # pylint: disable=g-import-not-at-top
  from ops import config as ops_config  # pylint: disable=g-import-not-at-top
  backend, default = jax.default_backend(), ops_config.interpret_from_env()
  if default is False and backend not in ("gpu", "tpu"):
    raise pytest.UsageError(
        f"GEMKIT_INTERPRET=0 compiles the kernels for the device, but the backend is "
        f"{backend!r}; on a CPU use --kernel-target=gpu to select as the device would")
  # Kernels compile where ops.config's default does not interpret them.
  compiled = default is False or (default is None and backend in ("gpu", "tpu"))
  target = config.getoption("--kernel-target") or (backend if compiled else None)
  if compiled:
    jax.config.update("jax_default_matmul_precision", "highest")
  config._gemkit_compiled = compiled  # pylint: disable=protected-access
  config._gemkit_kernel_target = target  # pylint: disable=protected-access


def _families(item) -> set[str]:
  params = getattr(getattr(item, "callspec", None), "params", {})
  found = {v for v in params.values() if isinstance(v, str) and v in FAMILIES}
  return found | {m.name for m in item.iter_markers() if m.name in FAMILIES}


@pytest.hookimpl(tryfirst=True)   # before -m deselects on the markers added here
def pytest_collection_modifyitems(config, items):
  target = _target(config)
  for item in items:
    families = _families(item)
    for family in families:
      item.add_marker(family)
    if target is None:
      continue
    other = families - {f"pallas_{target}"}
    if other:
      mode = "compiled" if _compiled(config) else "--kernel-target, interpreted"
      item.add_marker(pytest.mark.skip(
          reason=f"runs a {', '.join(sorted(other))} kernel, which compiles only for "
                 f"{'a TPU' if 'pallas_tpu' in other else 'a GPU'} ({mode}: {target})"))


@pytest.fixture(autouse=True)
def _reset_tpu_interpret_state():
  """After an exception inside TPU interpret mode its state must be reset."""
  yield
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  pltpu.reset_tpu_interpret_mode_state()


@pytest.fixture(autouse=True)
def _kernel_runs_match_markers(request, monkeypatch):
  """In tests/ops: every kernel that runs is of a family the test is marked
  with, a GPU kernel is not handed ``interpret`` by the test, and under
  GEMKIT_INTERPRET=0 the device's kernels really compile."""
  path = pathlib.Path(str(getattr(request.node, "path", None) or request.node.fspath))
  if _OPS_TESTS not in path.parents:
    yield
    return
  from ops import config  # pylint: disable=g-import-not-at-top
  marked = {m.name for m in request.node.iter_markers() if m.name in FAMILIES}
  compiled, target = _compiled(request.config), _target(request.config)
  resolve = config.resolve_interpret

  def checked(interpret, kernel_target):
    value = resolve(interpret, kernel_target)
    family = f"pallas_{kernel_target}"
    problem = None
    if kernel_target == "gpu" and interpret not in (None, False):
      problem = (f"passes interpret={interpret!r} to a {family} kernel: leave it None so "
                 "that GEMKIT_INTERPRET=0 compiles it on the device")
    elif value is not False:  # the kernel runs, interpreted (a cross-lowering has False)
      if compiled and kernel_target == target:
        problem = f"a {family} kernel ran interpreted ({value!r}) on the device"
      elif family not in marked:
        problem = (f"runs a {family} kernel but is not marked {family} "
                   f"(@pytest.mark.{family}; see tests/conftest.py)")
    if problem:
      pytest.fail(problem, pytrace=False)   # BaseException: no `except Exception` hides it
    return value

  checked.__wrapped__ = resolve
  monkeypatch.setattr(config, "resolve_interpret", checked)
  yield
