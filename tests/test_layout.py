"""The source tree keeps its layering: no import cycles, no upward or sideways imports inside utils/."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import imports  # noqa: E402  (tools/imports.py)


def test_utils_has_no_cycles_and_no_upward_imports():
    bad, cycles = imports.check(ROOT)
    assert bad == [] and cycles == []


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    (tmp_path / "utils" / "models").mkdir(parents=True)
    (tmp_path / "utils" / "detection").mkdir()
    for f in ("utils/__init__.py", "utils/models/__init__.py", "utils/detection/__init__.py", "utils/io.py"):
        (tmp_path / f).write_text("")
    (tmp_path / "utils" / "cli.py").write_text("from .io import x\n")                      # layer 0 -> 1: upward
    (tmp_path / "utils" / "models" / "a.py").write_text("def f():\n    from ..detection import b\n")  # 3 -> 4
    (tmp_path / "utils" / "detection" / "b.py").write_text("from ..models import a\n")
    bad, cycles = imports.check(str(tmp_path))
    assert "utils.cli -> utils.io (layer 0 -> 1)" in bad
    assert "utils.models.a -> utils.detection.b (layer 3 -> 4)" in bad
    assert cycles == [["utils.detection.b", "utils.models.a"]]


def test_docs_layout_names_every_module():
    """docs/layout.md's tree lists every file of utils/ (a module added without a line there fails this)."""
    with open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [os.path.relpath(path, ROOT) for name, path in sorted(imports.modules(ROOT).items())
               if not path.endswith("__init__.py") and os.path.basename(path) not in text]
    assert missing == []
