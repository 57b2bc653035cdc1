"""notebooks/vit_tutorial.ipynb runs top to bottom, offline, on a CPU."""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "vit_tutorial.ipynb"


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the tutorial has no code cells"
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        "strip the outputs before committing (e.g. jupyter nbconvert --clear-output)"
    )


@pytest.mark.slow
def test_tutorial_runs_top_to_bottom(tmp_path, monkeypatch, digits_data_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # One extra cell, in this copy only: which interpreter the kernel really ran.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))

    # The kernel inherits this environment: train into tmp_path on the session's prepared digits,
    # never touch the network.
    monkeypatch.setenv("VIT_TUTORIAL_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("TFDS_DATA_DIR", digits_data_dir)
    monkeypatch.delenv("VIT_TUTORIAL_ONLINE", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    # Kernel "python3" with argv[0] == "python" is started with this process's interpreter (the venv).
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 8, f"expected the tutorial's figures, got {len(images)}"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "flatten + linear == strided convolution: True" in text
    assert "test accuracy after" in text
    assert "Skipped: this cell needs the network" in text
    kernel_python = nb.cells[-1].outputs[0]["text"].strip()
    assert kernel_python == sys.executable, "the kernel must run the interpreter of the tests"
    assert (tmp_path / "workdir" / "checkpoints").is_dir()
