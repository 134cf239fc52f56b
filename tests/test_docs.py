"""The documentation site and the README stay consistent with the code and the benchmark results.

Static checks only (no MkDocs build here: CI runs `mkdocs build --strict`): every public name has an
entry in the API reference pointing at where it is defined, every page and notebook is in the
navigation and exists, the README's links resolve, and every measured table between
<!-- name --> markers equals what benchmarks/update_readme.py writes from the JSON results.
"""

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("docs")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# `::: module.attr` followed by its options block, of which we read `heading:`
ENTRY = re.compile(r"^::: (?P<path>[\w.]+)\n(?P<options>(?:[ \t]+.*\n?)*)", re.M)


def _package_exports() -> dict[str, str]:
    """Public name (as users write it) -> the dotted path of its definition, read from the sources."""
    tree = ast.parse((ROOT / "jr_jax" / "__init__.py").read_text())
    exports = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets))
    out = {f"jr_jax.{name}": f"jr_jax{module}.{attr}" for name, (module, attr) in exports.items()}
    for sub in ("eeg", "sensitivity"):
        for node in ast.parse((ROOT / "jr_jax" / sub / "__init__.py").read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for alias in node.names:
                    out[f"jr_jax.{sub}.{alias.asname or alias.name}"] = f"jr_jax.{sub}.{node.module}.{alias.name}"
    return out


def _api_entries() -> dict[str, str]:
    """Heading shown in the API reference -> the `:::` path it renders, over docs/api/*.md."""
    entries = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for m in ENTRY.finditer(page.read_text()):
            heading = re.search(r"^\s+heading:\s*(\S+)\s*$", m.group("options"), re.M)
            assert heading, f"{page.name}: the entry for {m.group('path')} has no 'heading:' option"
            assert heading.group(1) not in entries, f"{heading.group(1)} is documented twice"
            entries[heading.group(1)] = m.group("path")
    return entries


def test_every_public_name_is_in_the_api_reference():
    exports, entries = _package_exports(), _api_entries()
    assert len(exports) > 40  # the parse found the export table and both subpackages
    missing = sorted(set(exports) - set(entries))
    assert not missing, f"public names without an entry in docs/api/: {missing}"
    stale = sorted(set(entries) - set(exports))
    assert not stale, f"docs/api/ documents names that are not public (any more): {stale}"
    wrong = {name: (entries[name], path) for name, path in exports.items() if entries[name] != path}
    assert not wrong, f"API entries that point elsewhere than the export table (entry, defined at): {wrong}"


def _nav_files(nav) -> list[str]:
    files = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


@pytest.fixture(scope="module")
def nav() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    return _nav_files(config["nav"])


def test_every_page_in_the_navigation_exists(nav):
    assert len(nav) > 15
    missing = [f for f in nav if not (DOCS / f).is_file()]
    assert not missing, f"mkdocs.yml lists pages that do not exist under docs/: {missing}"


def test_every_page_and_notebook_is_in_the_navigation(nav):
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "study"}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert {"notebooks/inference.ipynb", "notebooks/gradient_sensitivity.ipynb", "notebooks/oat_sweeps.ipynb"} <= notebooks
    left_out = sorted((pages | notebooks) - set(nav))
    assert not left_out, f"pages or notebooks missing from the nav of mkdocs.yml (one line each): {left_out}"


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_is_short_and_links_resolve():
    text = _readme()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) > 10
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, f"README links to missing files: {broken}"
    for notebook in ("inference", "gradient_sensitivity", "oat_sweeps", "real_erp"):
        assert f"notebooks/{notebook}.ipynb" in text


def test_getting_started_shows_the_readme_tour():
    """The README's first python block runs in tests/test_readme.py; the copy on the site is the same."""
    block = lambda text: re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]  # noqa: E731
    assert block((DOCS / "getting-started.md").read_text()) == block(_readme())


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measured_tables_match_the_benchmark_results():
    """Each block between <!-- name --> markers is what update_readme.py writes from the JSON results,
    so no number in the README or the guides is typed by hand or left behind by a rerun."""
    upd = _update_readme()
    seen = set()
    for page in upd.pages():
        text = page.read_text()
        for name, fill in upd.TABLES:
            for m in re.finditer(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S):
                seen.add(name)
                assert m.group(1) == fill(page) + "\n", (
                    f"{page.relative_to(ROOT)}: the {name} block differs from the benchmark results; "
                    "run python benchmarks/update_readme.py")
    assert seen == {name for name, _ in upd.TABLES}, f"markers with no block: {sorted({n for n, _ in upd.TABLES} - seen)}"
