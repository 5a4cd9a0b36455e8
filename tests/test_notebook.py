"""examples/quickstart.ipynb runs top to bottom, headless, with small settings.

The notebook reads ``GEMKIT_QUICKSTART_STEPS`` and ``GEMKIT_QUICKSTART_WORKDIR``
(its parameters cell); the
kernel is this interpreter (a kernelspec written for the test), so CI's
``.venv-ci`` runs it. Any cell error fails the test (nbclient raises
``CellExecutionError`` with the cell and its traceback).
"""

import pathlib
import sys

import nbclient
import nbformat
from ipykernel import kernelspec

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
KERNEL = "gemkit-test"


def test_quickstart_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert any("parameters" in c.metadata.get("tags", ()) for c in code)


def test_quickstart_executes(tmp_path, monkeypatch):
  # This interpreter as the kernel, whatever kernelspecs the machine has.
  kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL)
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("GEMKIT_QUICKSTART_STEPS", "8")
  monkeypatch.setenv("GEMKIT_QUICKSTART_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
  # The plots came back as images, the parameters as a treescope rendering.
  data = [o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert sum("image/png" in d for d in data) >= 2
  assert any("text/html" in d and "treescope" in d["text/html"] for d in data)
