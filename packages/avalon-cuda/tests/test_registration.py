"""avalon-cuda registers the `cuda` device kind through the `avalon` entry-point
group, and says clearly why it cannot be used on a machine without CuPy or
without a GPU.  These run everywhere; the checks of an unusable backend skip
where a GPU is usable, and their counterparts run there instead."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

import avalon
from avalon_cuda import gpu_available

AVAILABLE, WHY = gpu_available()
needs_no_gpu = pytest.mark.skipif(AVAILABLE, reason="a CUDA GPU is usable here")
needs_gpu = pytest.mark.skipif(not AVAILABLE, reason=f"needs a usable CUDA GPU: {WHY}")


def _run(code):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_cuda_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="avalon")}
    assert eps.get("cuda") == "avalon_cuda.plugin"
    from avalon_cuda.backend import CudaBackend
    assert (CudaBackend.name, CudaBackend.package, CudaBackend.priority) == ("cuda", "avalon-cuda", 10)


def test_the_backend_comes_from_the_plugin():
    from avalon.plugins import call_each
    from avalon_cuda.backend import CudaBackend
    provided = [cls for name, classes in call_each("avalon_backends") if name == "cuda" for cls in classes]
    assert provided == [CudaBackend]
    assert not [p for p, _ in avalon.plugin_errors() if p == "cuda"], avalon.plugin_errors()


@needs_no_gpu
def test_cuda_is_listed_as_unavailable_with_the_reason():
    status = {b.name: b for b in avalon.backends()}
    assert "cuda" in status, status
    cuda = status["cuda"]
    assert cuda.package == "avalon-cuda"
    assert cuda.available is False
    assert "CuPy" in cuda.reason or "CUDA device" in cuda.reason, cuda.reason
    assert cuda.reason == WHY
    assert "unavailable: " + cuda.reason in str(cuda)


@needs_no_gpu
def test_selecting_cuda_raises_a_device_error_that_says_what_is_missing():
    for spec in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(avalon.DeviceError) as e:
            avalon.device(spec)
        msg = str(e.value)
        assert "not available" in msg and WHY in msg, msg
        # what to install, when CuPy is what is missing
        if "not installed" in WHY:
            assert "pip install cupy-cuda12x" in msg, msg
            assert 'pip install -e "packages/avalon-cuda[cuda]"' in msg, msg


@needs_no_gpu
def test_the_best_available_device_is_the_cpu():
    assert avalon.best_available_device() == avalon.device("cpu")


def test_the_plugin_imports_without_cupy():
    """With `import cupy` failing, the plugin still loads and the backend is
    listed with the reason; the CPU keeps working."""
    out = _run("""
        import sys
        sys.modules["cupy"] = None            # makes `import cupy` raise ImportError
        import numpy as np, avalon
        import avalon_cuda.plugin
        from avalon_cuda import _compat
        assert _compat.cupy is None
        status = {b.name: b for b in avalon.backends()}
        assert status["cuda"].available is False, status
        assert "CuPy" in status["cuda"].reason, status["cuda"].reason
        assert not avalon.plugin_errors(), avalon.plugin_errors()
        try:
            avalon.device("cuda")
        except avalon.DeviceError as e:
            print("refused:", e)
        else:
            raise AssertionError("cuda was selectable without CuPy")
        assert avalon.best_available_device() == avalon.device("cpu")
        assert avalon.exp(np.zeros(2, np.float32)).tolist() == [1.0, 1.0]
    """)
    assert "refused: device 'cuda:0' is not available: CuPy" in out, out


def test_gpu_available_reports_a_reason_exactly_when_unavailable():
    ok, why = gpu_available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert (why == "") == ok


@needs_gpu
def test_cuda_is_available_and_preferred_over_the_cpu():
    status = {b.name: b for b in avalon.backends()}
    assert status["cuda"].available, status["cuda"]
    assert avalon.best_available_device() == avalon.device("cuda:0")
    assert str(avalon.device("cuda")) == "cuda:0"


@needs_gpu
def test_a_device_index_past_the_last_gpu_is_refused():
    from avalon_cuda._compat import device_count
    n = device_count()
    with pytest.raises(avalon.DeviceError, match=f"this machine has {n} CUDA device"):
        avalon.device(f"cuda:{n}")
