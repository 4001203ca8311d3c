"""ARCHITECTURE.md's module map stays the layout's: every module of the libraries and the CLI is named."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("avprep", "ogmge_train", "cli")


def _named(rel: str, text: str) -> bool:
    """``rel`` by its path, as ``<folder>/<name>.py`` (one module per dataset), or by its file name
    where its folder is named (a package's row, or the method table, lists its modules)."""
    folder, name = rel.rsplit("/", 1)
    return (rel in text or f"{folder}/<name>.py" in text
            or (name in text and f"`{folder}/" in text and name != "__init__.py")
            or (name == "__init__.py" and f"`{folder}/" in text))


def test_every_module_is_in_the_architecture_map():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    modules = sorted(p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(modules) > 60
    missing = [m for m in modules if not _named(m, text)]
    assert not missing, f"modules ARCHITECTURE.md does not name: {missing}"
