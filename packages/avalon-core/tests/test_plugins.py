"""Backends arrive as pluggy plugins: the built-in CPU backend and a third-party
one installed from a fixture folder go through the same entry-point path."""
import importlib.metadata
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import avalon
from avalon import hookspecs, plugins
from avalon.backends import Backend

REPO = Path(__file__).resolve().parents[3]
TOY = REPO / "tests" / "fixtures" / "avalon-toy-backend"


def test_cpu_backend_comes_from_the_entry_point_group():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="avalon")}
    assert eps.get("cpu") == "avalon.backends.cpu"
    assert [b.name for b in avalon.backends() if b.available] [:1] == ["cpu"] or "cpu" in [
        b.name for b in avalon.backends()]
    assert avalon.best_available_device() == avalon.device("cpu")


def test_every_hook_is_documented_with_its_calling_convention():
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("avalon_")]
    assert hooks, "no hookspecs found"
    for f in hooks:
        doc = inspect.getdoc(f) or ""
        assert len(doc) > 80, f"hook {f.__name__} is not documented"
        assert "firstresult" in doc and "historic" in doc, f"{f.__name__} must say firstresult/historic"


class _Broken:
    @avalon.hookimpl
    def avalon_backends(self):
        raise RuntimeError("driver exploded")


class _Unavailable(Backend):
    name = "fakegpu"
    package = "avalon-fakegpu"
    priority = 50

    @classmethod
    def availability(cls):
        return False, "no fake GPU is present on this machine"


class _UnavailablePlugin:
    @avalon.hookimpl
    def avalon_backends(self):
        return [_Unavailable]


def test_a_broken_plugin_is_reported_not_fatal():
    plugins.register(_Broken(), name="broken-test-plugin")
    try:
        with pytest.warns(RuntimeWarning, match="broken-test-plugin.*driver exploded"):
            names = [b.name for b in avalon.backends()]
        assert "cpu" in names
        assert any(p == "broken-test-plugin" for p, _ in avalon.plugin_errors())
        assert avalon.exp(np.zeros(2, np.float32)).tolist() == [1.0, 1.0]
    finally:
        plugins.unregister("broken-test-plugin")


def test_an_unavailable_backend_is_listed_with_its_reason():
    plugins.register(_UnavailablePlugin(), name="fakegpu-plugin")
    try:
        status = {b.name: b for b in avalon.backends()}
        assert status["fakegpu"].available is False
        assert "no fake GPU" in status["fakegpu"].reason
        with pytest.raises(avalon.DeviceError, match="not available: no fake GPU"):
            avalon.device("fakegpu")
        assert avalon.best_available_device() == avalon.device("cpu")
    finally:
        plugins.unregister("fakegpu-plugin")


def test_unknown_device_names_the_package_to_install(monkeypatch):
    from avalon.backends import KNOWN_PACKAGES
    assert KNOWN_PACKAGES["cuda"] == "avalon-cuda"
    monkeypatch.setitem(KNOWN_PACKAGES, "npu", "avalon-npu")
    with pytest.raises(avalon.DeviceError, match="pip install -e packages/avalon-npu"):
        avalon.device("npu:0")
    with pytest.raises(avalon.DeviceError, match="unknown device kind 'tpu'"):
        avalon.device("tpu")


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def toy_installed():
    _pip("install", "--no-build-isolation", "--no-deps", "-e", str(TOY))
    yield
    _pip("uninstall", "-y", "avalon-toy-backend")


def _run(code, **env):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env={**os.environ, **env}, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_third_party_backend_trains_with_no_change_to_core(toy_installed):
    out = _run("""
        import numpy as np, avalon
        from avalon_toy_backend import ToyArray, ToyBackend
        assert "toy" in [b.name for b in avalon.backends()]
        rng = np.random.default_rng(0)
        model = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
        x = rng.standard_normal((5, 4)).astype(np.float32)
        def loss(m, x):
            return avalon.mean(avalon.tanh(x @ m["w"] + m["b"]) ** 2)
        ref_loss, ref_g = avalon.grad(loss, model, x)
        toy_model = avalon.to_device(model, "toy")
        toy_x = avalon.to_device(x, "toy")
        assert type(toy_model["w"]) is ToyArray
        l, g = avalon.grad(loss, toy_model, toy_x)
        assert type(g[0]["w"]) is ToyArray, type(g[0]["w"])
        assert ToyBackend.matmul_calls >= 3  # forward + two backward matmuls use the override
        np.testing.assert_allclose(np.asarray(l), np.asarray(ref_loss), rtol=1e-6)
        back = avalon.to_device(g, "cpu")
        assert type(back[0]["w"]) is np.ndarray
        np.testing.assert_allclose(back[0]["w"], ref_g[0]["w"], rtol=1e-5, atol=1e-7)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_third_party_backend_passes_the_conformance_suite(toy_installed):
    r = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "avalon.testing.conformance", "-q",
                        "-p", "no:cacheprovider", "-x"], capture_output=True, text=True,
                       env={**os.environ, "AVALON_TEST_DEVICE": "toy"}, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
