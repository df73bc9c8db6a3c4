"""The conformance suite pointed at a device it cannot test says so once.

An unknown device name is a mistake in how the suite was invoked: one error
that names the device.  A device whose backend is installed but not usable here
(no GPU, no driver) is not a failure of the backend: every test is skipped
with the backend's own reason.  Neither may turn into one failure per case.

The suite is run the two ways backends run it, each in a pytest subprocess:
collected directly (`pytest --pyargs avalon.testing.conformance`, device from
AVALON_TEST_DEVICE) and imported into a test module that overrides the
`avalon_device` fixture (as avalon-cuda and third-party backends do)."""
import os
import re
import subprocess
import sys

import pytest

import avalon
from avalon import plugins
from avalon.backends import Backend
from avalon.testing import conformance

UNKNOWN = "no_such_device"
UNUSABLE = "unusable"
UNUSABLE_REASON = "the unusable test device is never present"

# A pytest plugin module (loaded with -p) that registers an installed-but-unusable
# backend before the suite is collected, as an entry point would.
UNUSABLE_PLUGIN = f'''
import sys
import avalon
from avalon.backends import Backend


class UnusableBackend(Backend):
    name = {UNUSABLE!r}
    package = "avalon-unusable-test-backend"

    @classmethod
    def availability(cls):
        return False, {UNUSABLE_REASON!r}


@avalon.hookimpl
def avalon_backends():
    return [UnusableBackend]


avalon.plugins.register(sys.modules[__name__], name="unusable-test-backend")
'''

SUITE_WITH_FIXTURE = '''
import pytest
from avalon.testing.conformance import *  # noqa: F401,F403


@pytest.fixture
def avalon_device():
    return {device!r}
'''


def _outcomes(output: str) -> dict[str, int]:
    """{'passed': 3, 'skipped': 2, ...} from pytest's final summary line."""
    last = output.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}
    if "errors" in counts:
        counts["error"] = counts.pop("errors")
    return counts


def _run_pytest(tmp_path, *args, device=None):
    (tmp_path / "unusable_backend_plugin.py").write_text(UNUSABLE_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("AVALON_TEST_DEVICE", None)
    if device is not None:
        env["AVALON_TEST_DEVICE"] = device
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "unusable_backend_plugin", "-p", "no:cacheprovider",
                        "-q", "-rfEs", "--rootdir", str(tmp_path), *args],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    output = r.stdout + r.stderr
    return r.returncode, output, _outcomes(r.stdout)


def _run_imported_suite(tmp_path, device):
    (tmp_path / "test_suite_on_device.py").write_text(SUITE_WITH_FIXTURE.format(device=device))
    return _run_pytest(tmp_path, "test_suite_on_device.py")


def _number_of_cases():
    return 2 * len(conformance.conformance_params()) + len(
        [c for c, _ in conformance.conformance_params() if c.differentiable])


def _assert_all_skipped_with_the_reason(rc, output, outcomes):
    """Every case skipped (exit status 0: nothing failed), and the skip summary is
    one line, carrying the backend's reason."""
    assert rc == 0, output[-3000:]
    assert outcomes == {"skipped": _number_of_cases()}, output[-3000:]
    skip_lines = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert len(skip_lines) == 1 and UNUSABLE_REASON in skip_lines[0], output[-3000:]


# -- collected directly: the device is known before any test runs ------------------------------

def test_collected_directly_on_an_unknown_device_is_one_error(tmp_path):
    rc, output, outcomes = _run_pytest(tmp_path, "--pyargs", "avalon.testing.conformance", device=UNKNOWN)
    assert rc != 0, output[-3000:]
    assert outcomes == {"error": 1}, output[-3000:]
    assert f"unknown device kind {UNKNOWN!r}" in output and "AVALON_TEST_DEVICE" in output, output[-3000:]


def test_collected_directly_on_an_unusable_device_skips_every_test_with_the_backends_reason(tmp_path):
    rc, output, outcomes = _run_pytest(tmp_path, "--pyargs", "avalon.testing.conformance", device=UNUSABLE)
    _assert_all_skipped_with_the_reason(rc, output, outcomes)


# -- imported, with the avalon_device fixture overridden ----------------------------------------

def test_imported_with_an_unknown_device_fails_once_and_runs_nothing_else(tmp_path):
    rc, output, outcomes = _run_imported_suite(tmp_path, UNKNOWN)
    assert rc != 0, output[-3000:]
    assert outcomes.get("failed", 0) + outcomes.get("error", 0) == 1, output[-3000:]
    assert "passed" not in outcomes and "xfailed" not in outcomes, output[-3000:]
    assert outcomes.get("skipped") == _number_of_cases() - 1, output[-3000:]
    assert f"unknown device kind {UNKNOWN!r}" in output, output[-3000:]


def test_imported_with_an_unusable_device_skips_every_test_with_the_backends_reason(tmp_path):
    rc, output, outcomes = _run_imported_suite(tmp_path, UNUSABLE)
    _assert_all_skipped_with_the_reason(rc, output, outcomes)


# -- run_conformance, without pytest ----------------------------------------------------------

class _UnusableBackend(Backend):
    name = UNUSABLE
    package = "avalon-unusable-test-backend"

    @classmethod
    def availability(cls):
        return False, UNUSABLE_REASON


class _UnusablePlugin:
    @avalon.hookimpl
    def avalon_backends(self):
        return [_UnusableBackend]


@pytest.fixture
def unusable_backend():
    plugins.register(_UnusablePlugin(), name="unusable-test-backend")
    try:
        yield
    finally:
        plugins.unregister("unusable-test-backend")


def test_run_conformance_on_an_unknown_device_raises_one_device_error():
    with pytest.raises(avalon.DeviceError, match=f"unknown device kind {UNKNOWN!r}") as info:
        conformance.run_conformance(UNKNOWN)
    assert not isinstance(info.value, conformance.DeviceUnavailable)


def test_run_conformance_on_an_unusable_device_raises_device_unavailable_with_the_reason(unusable_backend):
    with pytest.raises(conformance.DeviceUnavailable, match=UNUSABLE_REASON):
        conformance.run_conformance(UNUSABLE)


def test_require_device_accepts_a_usable_device():
    assert conformance.require_device("cpu") == avalon.device("cpu")
