"""The README's code tour runs as written (docs/getting-started.md shows the same block: tests/test_docs.py)."""

import re
from pathlib import Path

import numpy as np
import pytest


def test_readme_tour_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["erp"].shape == (256, 1201)
    assert np.isfinite(np.asarray(namespace["erp"])).all()
    assert namespace["ys"].shape == (1000, 6)
    assert np.isfinite(float(namespace["g"])) and float(namespace["g"]) != 0.0
    assert float(namespace["tvb"]["a"]) == pytest.approx(0.1)
