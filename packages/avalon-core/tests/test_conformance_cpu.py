"""The backend conformance suite (avalon.testing.conformance) run on the CPU
backend: eager and jit results equal the NumPy reference, of the declared
shapes and dtypes, and gradients equal the CPU's.  On the CPU this chiefly
checks that compiled code (jit, grad: fused, memory-planned) agrees with eager
execution and with the ops' shape rules."""
import pytest

from avalon.testing.conformance import *  # noqa: F401,F403  (the tests and the fixture)
from avalon.testing.conformance import run_conformance


@pytest.fixture
def avalon_device():
    return "cpu"


def test_run_conformance_without_pytest_reports_no_failures():
    from avalon.testing import cases_for
    subset = cases_for("add") + cases_for("sum") + cases_for("matmul") + cases_for("where")
    assert run_conformance("cpu", dtypes=("float32",), cases=subset) == []


def test_run_conformance_reports_a_failure():
    """A result that differs from the reference is reported: here the case adds a
    different constant on every call, so the device run disagrees with the CPU run."""
    import avalon
    from avalon.testing import Arg, OpCase

    calls = []

    def fn(x):
        calls.append(1)
        return avalon.add(x, float(len(calls)))   # a different constant on every call: eager != reference
    bad = OpCase(op="add", fn=fn, args=(Arg((3,)),), torch_fn=None, variant="deliberately_wrong")
    failures = run_conformance("cpu", dtypes=("float32",), cases=[bad], checks=("eager",))
    assert len(failures) == 1 and "add-deliberately_wrong" in failures[0], failures
