"""The example notebooks run from top to bottom (one epoch on a subset, as CI runs them)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["image", "audio", "video", "point_cloud", "time_series"]


def test_every_modality_has_a_notebook_written_by_the_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "examples" / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert sorted(builder.NOTEBOOKS) == sorted(NOTEBOOKS)
    for modality in NOTEBOOKS:
        committed = nbformat.read(ROOT / "examples" / f"{modality}.ipynb", as_version=4)
        fresh = builder.notebook(modality, builder.NOTEBOOKS[modality])
        assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], modality


@pytest.mark.slow
@pytest.mark.parametrize("modality", NOTEBOOKS)
def test_notebook_runs(modality, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPERCEPTION_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("UNIPERCEPTION_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    book = nbformat.read(ROOT / "examples" / f"{modality}.ipynb", as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(str(o.get("text", "")) for cell in book.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "test top-1" in outputs and "deploy form: max |difference|" in outputs
    assert any((tmp_path).rglob("*.onnx")), "the notebook exported no ONNX file"


def test_the_multimodal_notebook_is_the_builders():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "examples" / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    committed = nbformat.read(ROOT / "examples" / "multimodal.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in builder.multimodal_notebook().cells]


@pytest.mark.slow
def test_multimodal_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPERCEPTION_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("UNIPERCEPTION_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    book = nbformat.read(ROOT / "examples" / "multimodal.ipynb", as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(str(o.get("text", "")) for cell in book.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    for expected in ("image  test top-1", "audio  test top-1", "video  test top-1", "audio -> image: recall@1",
                     "video -> image: recall@1", "zero-shot by image prototypes"):
        assert expected in outputs, expected
    pictures = sum(1 for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
                   if "image/png" in o.get("data", {}))
    assert pictures >= 4  # the three sets, the curves, the embedding space, the similarities

