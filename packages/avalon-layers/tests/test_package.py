"""The avalon-layers package imports and reports the version its pyproject.toml declares."""

import importlib
import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _declared_version() -> str:
    text = PYPROJECT.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        section = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        assert section, f"no [project] table in {PYPROJECT}"
        match = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
        assert match, f"no [project] version in {PYPROJECT}"
        return match.group(1)
    return tomllib.loads(text)["project"]["version"]


def test_imports_with_declared_version():
    module = importlib.import_module("avalon_layers")
    assert module.__version__ == _declared_version()
