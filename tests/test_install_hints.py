"""Install instructions that work: Avalon's packages are installed from a clone
of this repository (they are not on PyPI, where `avalon-core` is another
project), so every README and every hint in the packages' code says
`pip install -e packages/<name>`, naming a package that exists here."""
import importlib
import re
from pathlib import Path

import numpy as np
import pytest

import avalon
import avalon.nn as nn
from avalon._install import install_command, install_hint
from avalon.backends import KNOWN_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"
TEXTS = sorted({*ROOT.glob("README.md"), *PACKAGES.glob("*/README.md"), *PACKAGES.glob("*/*.md"),
                *PACKAGES.glob("*/src/**/*.py"), *PACKAGES.glob("*/examples/*.py")})
# pip install avalon-x / "avalon-x[...]": resolves on PyPI, where these names are not Avalon's.
FROM_THE_INDEX = re.compile(r"pip install\s+(?:-U\s+)?[\"']?avalon[-_]")
FROM_THE_CLONE = re.compile(r"pip install -e [\"']?packages/([\w-]+)")


def test_the_texts_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in TEXTS}
    assert {"README.md", "packages/avalon-cuda/README.md",
            "packages/avalon-layers/src/avalon_layers/module.py"} <= names


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_text_installs_avalon_from_the_package_index(path):
    text = path.read_text(encoding="utf-8")
    assert not FROM_THE_INDEX.search(text), FROM_THE_INDEX.search(text).group(0)
    for name in FROM_THE_CLONE.findall(text):
        assert (PACKAGES / name / "pyproject.toml").is_file(), f"{path} installs {name}, which is not under packages/"


def test_install_command_names_a_package_directory():
    assert install_command("avalon-layers") == "pip install -e packages/avalon-layers"
    assert install_command("avalon-cuda", "cuda") == 'pip install -e "packages/avalon-cuda[cuda]"'
    assert "not on PyPI" in install_hint("avalon-cuda")
    for package in KNOWN_PACKAGES.values():
        assert (PACKAGES / package / "pyproject.toml").is_file(), package


def test_unknown_device_kind_says_how_to_install_its_package(monkeypatch):
    backends = importlib.import_module("avalon.backends")  # avalon.backends is also a function
    monkeypatch.setattr(backends, "_backend_classes", lambda: {"cpu": backends.Backend})
    with pytest.raises(avalon.DeviceError) as info:
        avalon.device("cuda")
    assert "pip install -e packages/avalon-cuda" in str(info.value)
    assert "from the root of a clone" in str(info.value)


def test_no_layer_set_installed_says_how_to_install_avalon_layers(monkeypatch):
    from avalon import layersets
    monkeypatch.setattr(layersets, "merged", lambda: {ns: {} for ns in layersets.NAMESPACES})
    with pytest.raises(AttributeError, match="pip install -e packages/avalon-layers"):
        layersets.lookup("nn", "Linear", "avalon.nn")


class CupyLikeArray:
    """Stands for a CuPy array where CuPy is not installed: same module name, same protocol."""
    __module__ = "cupy._core.core"

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.float32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0, False), "version": 3}


def test_a_cupy_array_passed_to_a_layer_says_how_to_install_avalon_cuda():
    layer = nn.Linear(3, 2)
    with pytest.raises(avalon.errors.AvalonError) as info:
        layer(CupyLikeArray((4, 3)))
    message = str(info.value)
    assert "pip install -e packages/avalon-cuda" in message, message
    assert "value.get()" in message
