"""docs/deepep_cupy_tour.ipynb runs top to bottom in a fresh Jupyter kernel (nbclient), on the CPU
reference backend where there is no GPU, so the tour cannot rot.

Needs nbclient, nbformat and ipykernel (the test extra); skips with a reason without them.
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NOTEBOOK = os.path.join(ROOT, "docs", "deepep_cupy_tour.ipynb")


def _outputs(nb) -> str:
    """Every cell's printed text and results, joined."""
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                text.append(out["text"])
            text.extend(str(v) for k, v in out.get("data", {}).items() if k == "text/plain")
    return "\n".join(text)


def test_tour_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    missing = [m for m in ("nbformat", "nbclient", "ipykernel") if _absent(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install nbclient nbformat ipykernel)")
    import nbclient
    import nbformat
    # the kernel imports this checkout's package (as the tests do), and compiles into tmp_path only
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("DEEPEP_CUPY_CACHE_DIR", str(tmp_path / "kernels"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()     # raises CellExecutionError, with the cell and its traceback, on any failure
    text = _outputs(nb)
    for expected in ("dispatch equals the oracle bit for bit: True", "DeepEPTimeout: dispatch: rank 0 timed out",
                     "DeepEPInvalid", "done"):
        assert expected in text, f"{expected!r} not in the notebook's output:\n{text[-4000:]}"
    if not _absent("cuda.bindings"):   # the JIT can compile here: the reload must have happened
        assert "edited  key" in text and "from_cache=False" in text, text[-4000:]


def _absent(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:   # a parent package missing (cuda.bindings without cuda)
        return True
