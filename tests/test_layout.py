"""The layout DESIGN.md and the README promise: imports point one way and never in a circle.

Every ``import`` of the project's own modules counts, function-level ones too
(a function-level import that dodged a cycle would still close it here).
"""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "models", "gemkit", "launch")
# gemkit.surgery changes models; it may not reach a driver or anything that loads runs.
SURGERY_MAY_NOT_IMPORT = ("gemkit.runs", "gemkit.train", "gemkit.studies", "gemkit.hf",
                          "gemkit.evaluate", "gemkit.lm_harness", "launch")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py"):
      out[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The project modules ``path`` imports (``from a.b import c`` counts a.b.c if a module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name:
        found.add(name)
  return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    # A package's own submodules importing its __init__ (``from gemkit.hf import x``) is
    # not an edge back to the importer.
    graph[name] = {m for m in _imports(path, modules)
                   if m != name and not name.startswith(m + ".")}
  return graph


def _cycle(graph) -> list[str] | None:
  """One import cycle, or None (depth-first search with an explicit path)."""
  done: set[str] = set()
  for root in sorted(graph):
    path, on_path, iters = [root], {root}, [iter(sorted(graph[root]))]
    while iters:
      nxt = next(iters[-1], None)
      if nxt is None:
        on_path.discard(path[-1])
        done.add(path.pop())
        iters.pop()
      elif nxt in on_path:
        return path[path.index(nxt):] + [nxt]
      elif nxt not in done:
        path.append(nxt)
        on_path.add(nxt)
        iters.append(iter(sorted(graph.get(nxt, ()))))
  return None


def test_no_import_cycle(graph):
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_imports_point_one_way(graph):
  order = {p: i for i, p in enumerate(PACKAGES)}
  backwards = [(a, b) for a, targets in graph.items() for b in targets
               if order[b.split(".")[0]] > order[a.split(".")[0]]]
  assert not backwards, f"imports against ops <- models <- gemkit <- launch: {backwards}"


def test_surgery_imports_no_driver(graph):
  bad = [(a, b) for a, targets in graph.items() if a.startswith("gemkit.surgery")
         for b in targets if b.startswith(SURGERY_MAY_NOT_IMPORT)]
  assert not bad, f"gemkit.surgery reaches a driver: {bad}"


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_config_imports_neither_jax_nor_orbax():
  code = ("import sys; from gemkit import config; "
          "print(sorted(m for m in ('jax', 'orbax', 'grain', 'flax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]"
