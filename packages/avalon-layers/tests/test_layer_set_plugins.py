"""Third-party layer sets arrive through the ``avalon`` entry-point group, next
to avalon-layers: their names appear in avalon.nn / avalon.nn.functional, and
two sets defining the same name is an error that names both.

Each fixture under tests/fixtures/ is pip-installed into a private folder
(``pip install --target``) that only the test's subprocesses put on their path:
installing it into the shared environment would change avalon.nn for every
other process using that environment while the test runs (the clashing set
would break them all)."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import avalon
import avalon.nn

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures"


def _install(src: Path, tmp_path_factory) -> Path:
    """Install the fixture project at `src` into a fresh folder; returns the folder."""
    work = tmp_path_factory.mktemp(src.name)
    project = work / "project"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(src, project, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install",
                        "--no-build-isolation", "--no-deps", "--no-compile", "--target", str(site), str(project)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return site


@pytest.fixture(scope="module")
def extra_site(tmp_path_factory):
    return _install(FIXTURES / "avalon-extra-layers", tmp_path_factory)


@pytest.fixture(scope="module")
def clashing_site(tmp_path_factory):
    return _install(FIXTURES / "avalon-clashing-layers", tmp_path_factory)


def _run(code: str, *sites: Path) -> str:
    path = os.pathsep.join([*map(str, sites), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": path}, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_fixture_sets_are_not_installed_in_this_environment():
    with pytest.raises(AttributeError, match="Swish"):
        avalon.nn.Swish  # noqa: B018
    assert avalon.nn.Module is not None


def test_a_third_party_layer_set_joins_avalon_nn_and_trains(extra_site):
    out = _run("""
        import numpy as np
        import avalon, avalon.nn as nn, avalon.nn.functional as F
        import avalon_extra_layers

        assert nn.Swish is avalon_extra_layers.Swish and F.swish is avalon_extra_layers.swish
        assert "Swish" in dir(nn) and "swish" in dir(F)
        assert nn.Module.__module__ == "avalon_layers.module"   # avalon-layers is still there
        assert not avalon.plugin_errors(), avalon.plugin_errors()

        act = nn.Swish(beta=1.5)
        x = np.linspace(-3, 3, 13).astype(np.float32)
        def loss(m, x):
            return avalon.sum(m(x) ** 2)
        value, (g_act, g_x) = avalon.grad(loss, act, x)

        b = np.float64(1.5); xd = x.astype(np.float64)
        s = 1 / (1 + np.exp(-b * xd)); y = xd * s
        np.testing.assert_allclose(value, np.sum(y ** 2), rtol=1e-5)
        np.testing.assert_allclose(g_x, 2 * y * (s + b * xd * s * (1 - s)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_act.beta, np.sum(2 * y * xd * xd * s * (1 - s)), rtol=1e-4)
        np.testing.assert_allclose(F.swish(x), x * (1 / (1 + np.exp(-x))), rtol=1e-6, atol=1e-7)
        print("ok")
    """, extra_site)
    assert out.strip() == "ok"


def test_a_clashing_layer_set_is_an_error_naming_both_sets(extra_site, clashing_site):
    out = _run("""
        import avalon, avalon.nn
        from avalon.layersets import LayerSetClash
        for name in ("Linear", "Module", "Swish"):   # the whole namespace is refused, not one name
            try:
                getattr(avalon.nn, name)
            except LayerSetClash as e:
                msg = str(e)
            else:
                raise AssertionError(f"avalon.nn.{name} did not raise LayerSetClash")
            assert "avalon.nn.Linear" in msg, msg
            assert "'avalon-layers' (avalon-layers)" in msg, msg
            assert "'clashing' (avalon-clashing-layers)" in msg, msg
        assert issubclass(LayerSetClash, avalon.AvalonError)
        print(msg)
    """, extra_site, clashing_site)
    assert "both define avalon.nn.Linear" in out
