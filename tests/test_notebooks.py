"""The notebooks run top to bottom at small sizes (the stored copies carry their figures), use the
public API only, and quote no number in their markdown that a code cell does not print."""

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

HERE = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("make_notebooks", HERE / "make_notebooks.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)


@pytest.mark.parametrize("name", sorted(make.NOTEBOOKS))
def test_notebook_uses_the_public_api_and_prints_its_numbers(name):
    cells = make.NOTEBOOKS[name]
    code = "\n".join(src for kind, src in cells if kind == "code")
    assert not re.search(r"jr_jax\._|from jr_jax\.\w*\._|import jr_jax\.\w*\._", code), "private jr_jax module"
    for kind, src in cells:
        if kind == "md" and src.lstrip().startswith("## Reading"):
            # a reading quotes no measured number (digits only in names and formulas: a_1..a_4, 1/λ)
            words = re.findall(r"(?<![\w.])\d[\d ,.]*\d*(?![\w])", src.replace("a_1..a_4", "").replace("1/λ", ""))
            assert not words, f"{name}: the Reading markdown quotes {words}; print them from a code cell"
    readings = [i for i, (kind, src) in enumerate(cells) if kind == "md" and src.lstrip().startswith("## Reading")]
    assert readings and cells[readings[-1] + 1][0] == "code" and "print(" in cells[readings[-1] + 1][1]


@pytest.mark.parametrize("name", sorted(make.NOTEBOOKS))
def test_notebook_runs_and_draws(name, tmp_path, monkeypatch):
    monkeypatch.delenv("JR_JAX_FULL", raising=False)
    stored = nbformat.read(HERE / name, as_version=4)
    # the stored notebook is the one the generator writes, executed
    assert [c.source for c in stored.cells] == [src for _, src in make.NOTEBOOKS[name]]
    assert any(o.output_type == "display_data" for c in stored.cells if c.cell_type == "code" for o in c.outputs)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.source) if c.cell_type == "code" else c for c in stored.cells]
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources=dict(metadata=dict(path=str(tmp_path)))).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "display_data"]
    assert len(figures) >= make.MIN_FIGURES[name]
