"""The example notebook runs top to bottom on the bundled demo model with small settings (nbclient)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB = os.path.join(ROOT, "examples", "sail_demo.ipynb")


def test_example_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    for k, v in {"MEMSHARP_NB_DETECT": "2", "MEMSHARP_NB_SAIL": "1", "MEMSHARP_NB_STEPS": "10"}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NB)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "demo: epsilon, latent 4x8x8, 2 + 2 prompts" in text
    assert "near-copies (pixel cosine > 0.7) before:" in text and "of 4" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
