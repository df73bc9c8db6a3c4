"""Backend conformance tests: every entry of the primitive table
(`avalon.testing.cases.CASES`), run on a device, must give what the CPU
backend (the NumPy reference) gives.

For each case and float dtype it checks

* eager: calling the op on arrays on the device gives results on that device,
  of the shape and dtype the op's shape rule declares, equal to the CPU result;
* jit: `avalon.jit` on the device gives the same;
* grad: `avalon.grad` on the device gives the CPU value and gradients.

Run it with pytest (the device comes from the fixture `avalon_device`: the
environment variable AVALON_TEST_DEVICE, else "cpu"; a backend's test module
that does `from avalon.testing.conformance import *` may override the fixture
after the import; AVALON_TEST_DTYPES lists the float dtypes, default
"float32,float64"):

    AVALON_TEST_DEVICE=cuda python3 -m pytest --pyargs avalon.testing.conformance

or without pytest: `failures = run_conformance("cuda")`.  A case's known bugs
(`OpCase.bugs`) turn its failures into expected failures.

A device the suite cannot test is reported once, not once per case: an
unknown device name (no installed backend provides it, or it is malformed) is
one error; a device whose backend is installed but not usable here (no GPU, no
driver) skips every test with the backend's reason (`require_device`).
"""
from __future__ import annotations

import os
import traceback
import zlib

import numpy as np

import avalon
from avalon.backends import backend_of
from avalon.errors import DeviceError

from .cases import CASES, FLOAT, OpCase, as_list

try:
    import pytest
except ImportError:  # run_conformance() needs no pytest
    pytest = None

__all__ = ["TOLERANCES", "FLOAT_DTYPES", "DeviceUnavailable", "require_device", "run_conformance", "check_eager",
           "check_jit", "check_grad", "conformance_params", "assert_close", "to_host", "make_loss", "cotangents",
           "declared_types"]
if pytest is not None:
    __all__ += ["avalon_device", "test_eager", "test_jit", "test_grad"]

#: (rtol, atol) for comparing a device's results with the CPU's, per float dtype
TOLERANCES = {"float16": (5e-3, 5e-3), "float32": (1e-5, 1e-5), "float64": (1e-10, 1e-12)}

FLOAT_DTYPES = tuple(d.strip() for d in os.environ.get("AVALON_TEST_DTYPES", "float32,float64").split(",")
                     if d.strip())


class ConformanceFailure(AssertionError):
    pass


class DeviceUnavailable(DeviceError):
    """The device's backend is installed but cannot run here (no GPU, no driver,
    ...); the message carries the backend's own reason."""


# -- the device under test ------------------------------------------------------------------

def _kind(device) -> str:
    if isinstance(device, avalon.Device):
        return device.kind
    return str(device).partition(":")[0].strip().lower()


def require_device(device) -> "avalon.Device":
    """The device to test, if it can be tested here.  Raises DeviceUnavailable
    when an installed backend provides it but is not usable (its availability
    reason in the message), DeviceError when no installed backend provides it
    or the name is malformed."""
    status = {b.name: b for b in avalon.backends()}.get(_kind(device))
    if status is not None and not status.available:
        raise DeviceUnavailable(f"device {str(device)!r} is not available: {status.reason}")
    return avalon.device(device)


# -- helpers ---------------------------------------------------------------------------------

def to_host(x) -> np.ndarray:
    """A result (array of any backend, or a NumPy scalar) as a NumPy array."""
    if isinstance(x, (np.generic, np.ndarray)):
        return np.asarray(x)
    return np.asarray(backend_of(x).to_host(x))


def _check_on_device(x, dev, what):
    if isinstance(x, np.generic):   # NumPy returns 0-d results as scalars
        if dev.kind == "cpu":
            return
        raise ConformanceFailure(f"{what}: a NumPy scalar came back, not an array on {dev}")
    got = backend_of(x).device
    if got != dev:
        raise ConformanceFailure(f"{what}: result lives on {got}, expected {dev}")


def assert_close(got, want, what=""):
    """Exact for integers and bools; TOLERANCES[dtype] for floats."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise ConformanceFailure(f"{what}: shape {got.shape}, expected {want.shape}")
    if got.dtype != want.dtype:
        raise ConformanceFailure(f"{what}: dtype {got.dtype}, expected {want.dtype}")
    if want.dtype.kind in "fc":
        rtol, atol = TOLERANCES.get(want.dtype.name, (1e-5, 1e-5))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def _device(dev):
    return avalon.device(dev)


def declared_types(case: OpCase, inputs):
    """(shape, dtype) of each output, as the ops' shape rules declare them."""
    g = avalon.trace(lambda *a: case.call(*a), *inputs)
    return [(tuple(n.shape), np.dtype(n.dtype)) for n in g.outputs]


def _reference(case, inputs):
    return [to_host(o) for o in as_list(case.call(*inputs))]


def _check_outputs(case, outs, ref, declared, dev, inputs, mode):
    if len(outs) != len(ref):
        raise ConformanceFailure(f"{mode}: {len(outs)} outputs, the CPU gives {len(ref)}")
    for k, (o, r, (shape, dtype)) in enumerate(zip(outs, ref, declared)):
        what = f"{case.id} {mode} output {k}"
        _check_on_device(o, dev, what)
        h = to_host(o)
        if h.shape != shape or h.dtype != dtype:
            raise ConformanceFailure(f"{what}: got {h.dtype}{list(h.shape)}, but the shape rule declares "
                                     f"{dtype}{list(shape)}")
        if case.random:
            if case.check is not None:
                case.check(h, *inputs)
        else:
            assert_close(h, r, what)


def cotangents(case, types):
    """A random cotangent for each output, given the outputs' (shape, dtype)."""
    rng = np.random.default_rng(zlib.crc32(("ct:" + case.id).encode()))
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in types]


def make_loss(case: OpCase, n_inputs: int):
    """loss(*inputs, *cotangents) = sum_k sum(output_k * cotangent_k): every output
    element contributes to the gradient."""
    def loss(*a):
        outs = as_list(case.call(*a[:n_inputs]))
        total = None
        for o, c in zip(outs, a[n_inputs:]):
            s = avalon.sum(avalon.mul(o, c))
            total = s if total is None else avalon.add(total, s)
        return total
    loss.__name__ = loss.__qualname__ = "loss_" + "".join(ch if ch.isalnum() else "_" for ch in case.id)
    return loss


# -- the three checks ---------------------------------------------------------------------------

# Every call gets freshly generated inputs (the same values: they depend only on
# the case id): an op such as assign writes into its input, and its result is
# that input.

def _device_inputs(case, float_dtype, dev):
    return [avalon.to_device(x, dev) for x in case.inputs(float_dtype)]


def check_eager(case: OpCase, device, float_dtype="float32"):
    dev = _device(device)
    ref = _reference(case, case.inputs(float_dtype))
    declared = declared_types(case, case.inputs(float_dtype))
    outs = as_list(case.call(*_device_inputs(case, float_dtype, dev)))
    _check_outputs(case, outs, ref, declared, dev, case.inputs(float_dtype), "eager")


def check_jit(case: OpCase, device, float_dtype="float32"):
    dev = _device(device)
    ref = _reference(case, case.inputs(float_dtype))
    declared = declared_types(case, case.inputs(float_dtype))
    f = avalon.jit(lambda *a: case.call(*a))
    outs = as_list(f(*_device_inputs(case, float_dtype, dev)))
    _check_outputs(case, outs, ref, declared, dev, case.inputs(float_dtype), "jit")
    # a second call reuses the compiled function (and its scratch buffers)
    outs2 = as_list(f(*_device_inputs(case, float_dtype, dev)))
    _check_outputs(case, outs2, ref, declared, dev, case.inputs(float_dtype), "jit (second call)")


def check_grad(case: OpCase, device, float_dtype="float32"):
    """True when checked, False when the case is not differentiable."""
    if not case.differentiable:
        return False
    dev = _device(device)
    inputs = case.inputs(float_dtype)
    cts = cotangents(case, declared_types(case, inputs))
    n = len(inputs)
    wrt = case.wrt
    host_args = inputs + cts
    ref_val, ref_grads = avalon.grad(make_loss(case, n), *host_args, argnums=wrt)
    dargs = _device_inputs(case, float_dtype, dev) + [avalon.to_device(c, dev) for c in cts]
    val, grads = avalon.grad(make_loss(case, n), *dargs, argnums=wrt)
    _check_on_device(val, dev, f"{case.id} grad value")
    assert_close(to_host(val), to_host(ref_val), f"{case.id} loss value")
    if len(grads) != len(host_args):
        raise ConformanceFailure(f"{case.id}: grad returned {len(grads)} gradients for {len(host_args)} "
                                 "arguments")
    for i in range(len(host_args)):
        g, rg = grads[i], ref_grads[i]
        if i not in wrt:
            if g is not None:
                raise ConformanceFailure(f"{case.id}: gradient of argument {i} (not in argnums) is not None")
            continue
        if g is None:
            raise ConformanceFailure(f"{case.id}: gradient of argument {i} is None")
        _check_on_device(g, dev, f"{case.id} grad {i}")
        gh = to_host(g)
        if gh.shape != inputs[i].shape or gh.dtype != inputs[i].dtype:
            raise ConformanceFailure(f"{case.id}: gradient {i} is {gh.dtype}{list(gh.shape)}, the input is "
                                     f"{inputs[i].dtype}{list(inputs[i].shape)}")
        assert_close(gh, to_host(rg), f"{case.id} gradient of argument {i}")
    return True


CHECKERS = {"eager": (check_eager, "forward"), "jit": (check_jit, "forward"), "grad": (check_grad, "grad")}


def conformance_params(dtypes=None, cases=None):
    """(case, float dtype) pairs: cases whose inputs have fixed dtypes run once."""
    dtypes = tuple(dtypes or FLOAT_DTYPES)
    out = []
    for c in (CASES if cases is None else cases):
        uses_float = any(a.dtype == FLOAT for a in c.args)
        for d in (dtypes if uses_float else dtypes[:1]):
            out.append((c, d))
    return out


def run_conformance(device, dtypes=None, cases=None, checks=("eager", "jit", "grad")) -> list[str]:
    """Run the conformance checks without pytest.  Returns one line per failure
    (empty when the backend conforms); failures of a case's known bugs are not
    reported.  A device that cannot be tested raises once (see require_device)."""
    require_device(device)
    failures = []
    for case, dtype in conformance_params(dtypes, cases):
        for name in checks:
            fn, kind = CHECKERS[name]
            try:
                fn(case, device, dtype)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                if case.bug(kind, dtype) is not None:
                    continue
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                failures.append(f"{name}[{case.id}-{dtype}] on {device}: {last}")
    return failures


# -- pytest ---------------------------------------------------------------------------------------

# Devices found unknown in this session: the first test that meets one fails with
# the reason, the rest are skipped, so a wrong name is one failure, not thousands.
_reported_unknown_devices: set[str] = set()


def _device_from_env() -> str:
    return os.environ.get("AVALON_TEST_DEVICE", "cpu")


def _device_problem(device) -> tuple[bool, str] | None:
    """None when `device` can be tested; else (unusable, why).  Computed outside
    any `except` block so that pytest reports the message alone, without the
    DeviceError's chained traceback."""
    try:
        require_device(device)
    except DeviceUnavailable as e:
        return True, str(e)
    except DeviceError as e:
        return False, f"the conformance suite cannot test device {str(device)!r}: {e}"
    return None


def _require_device_in_test(device):
    """Skip (unusable device) or fail once (unknown device) before a check runs;
    otherwise a known bug's xfail would also swallow the device error."""
    problem = _device_problem(device)
    if problem is None:
        return
    unusable, why = problem
    if unusable:
        pytest.skip(why)
    if str(device) in _reported_unknown_devices:
        pytest.skip(f"not run (reported once, by the first test that met it): {why}")
    _reported_unknown_devices.add(str(device))
    pytest.fail(why, pytrace=False)


def _run_check(name, case, device, dtype):
    _require_device_in_test(device)
    fn, kind = CHECKERS[name]
    bug = case.bug(kind, dtype)
    if bug is None:
        if fn(case, device, dtype) is False:
            pytest.skip(f"{case.id} is not differentiable")
        return
    try:
        r = fn(case, device, dtype)
    except Exception as e:  # noqa: BLE001
        pytest.xfail(f"known bug: {bug.reason} ({type(e).__name__})")
    if r is False:
        pytest.skip(f"{case.id} is not differentiable")


def pytest_generate_tests(metafunc):
    """Collected directly (`pytest --pyargs avalon.testing.conformance`), the
    module's own avalon_device fixture reads AVALON_TEST_DEVICE, so an unknown
    device is known before any test runs: it is a single collection error.  (An
    unusable device is not an error: its tests run and skip with the reason.)
    Not in __all__: a module that imports the suite and overrides avalon_device
    is checked test by test instead (_require_device_in_test)."""
    problem = _device_problem(_device_from_env())
    if problem is not None and not problem[0]:
        pytest.fail(f"{problem[1]} (the device comes from AVALON_TEST_DEVICE)", pytrace=False)


if pytest is not None:
    _PARAMS = [pytest.param(c, d, id=f"{c.id}-{d}") for c, d in conformance_params()]
    _GRAD_PARAMS = [p for p in _PARAMS if p.values[0].differentiable]

    @pytest.fixture
    def avalon_device():
        """The device under test: AVALON_TEST_DEVICE, else "cpu".  Override this
        fixture in the test module that imports the suite to test another device."""
        return _device_from_env()

    @pytest.mark.parametrize("case,dtype", _PARAMS)
    def test_eager(case, dtype, avalon_device):
        _run_check("eager", case, avalon_device, dtype)

    @pytest.mark.parametrize("case,dtype", _PARAMS)
    def test_jit(case, dtype, avalon_device):
        _run_check("jit", case, avalon_device, dtype)

    @pytest.mark.parametrize("case,dtype", _GRAD_PARAMS)
    def test_grad(case, dtype, avalon_device):
        _run_check("grad", case, avalon_device, dtype)
