"""The engine's threads and the segment driver's product helpers run on other CPUs
than their caller: Linux may wake a sleeping thread on its waker's CPU, and a split
step's two threads then shared one CPU for milliseconds (avalon.runtime.threads
._OffCaller; the driver's avl_keep_off)."""
import os

import numpy as np
import pytest

import avalon
from avalon.runtime import native, segments, threads

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2 or threads.current_cpu() is None,
    reason="thread placement needs Linux and two CPUs")


def _one_cpu_of_ours():
    return min(native.process_cpus())


def test_workers_run_off_the_callers_cpu_and_the_caller_gets_its_cpus_back():
    pool = threads._Workers(1)
    seen = {}

    def worker_job():
        seen["worker"] = os.sched_getaffinity(0)
        return threads.current_cpu()

    def caller_job():
        seen["caller"] = os.sched_getaffinity(0)
        return threads.current_cpu()

    before = os.sched_getaffinity(0)
    worker_cpu, caller_cpu = pool.run([(worker_job, ()), (caller_job, ())])
    assert seen["caller"] == {caller_cpu}                  # held on its CPU for the call
    assert caller_cpu not in seen["worker"] and worker_cpu != caller_cpu
    assert seen["worker"] == native.process_cpus() - {caller_cpu}
    assert os.sched_getaffinity(0) == before               # and given back after it


def test_a_worker_started_by_a_pinned_caller_may_use_every_cpu_of_the_process():
    cpu = _one_cpu_of_ours()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        pool = threads._Workers(1)          # its thread inherits the caller's one CPU
    finally:
        os.sched_setaffinity(0, before)
    assert os.sched_getaffinity(pool.off_caller.tids[0]) == native.process_cpus()


def test_a_failed_share_still_gives_the_caller_its_cpus_back():
    pool = threads._Workers(1)
    before = os.sched_getaffinity(0)

    def fails():
        raise ValueError("a share failed")
    with pytest.raises(ValueError, match="a share failed"):
        pool.run([(lambda: None, ()), (fails, ())])
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(segments.driver() is None, reason="no C compiler: no segment driver")
def test_product_helpers_run_off_the_callers_cpu(monkeypatch):
    monkeypatch.setenv("AVALON_C_DRIVER", "1")
    f = avalon.jit(lambda a, b: avalon.relu(a @ b) + a @ b, parallel=False)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 128)).astype(np.float32), rng.standard_normal((128, 256)).astype(np.float32)
    assert segments.splits_product(256, 256, 128)
    before = os.sched_getaffinity(0)
    for cpu in sorted(native.process_cpus())[:2]:
        os.sched_setaffinity(0, {cpu})        # the caller on `cpu`: its helpers elsewhere
        segments.set_product_threads(2)
        try:
            got = f(a, b)
        finally:
            segments.set_product_threads(1)
            os.sched_setaffinity(0, before)
        np.testing.assert_allclose(got, np.maximum(a @ b, 0) + a @ b, rtol=1e-4, atol=1e-4)
        driver = segments.driver()
        assert driver.avl_product_helpers() >= 1
        tid = driver.avl_product_helper_tid(0)
        assert tid > 0 and os.sched_getaffinity(tid) == native.process_cpus() - {cpu}


def test_avalon_pin_threads_0_leaves_the_threads_where_the_system_puts_them(monkeypatch):
    monkeypatch.setenv("AVALON_PIN_THREADS", "0")
    pool = threads._Workers(1)
    before = os.sched_getaffinity(0)
    seen = {}

    def caller_job():
        seen["caller"] = os.sched_getaffinity(0)
    pool.run([(lambda: None, ()), (caller_job, ())])
    assert seen["caller"] == before and os.sched_getaffinity(pool.off_caller.tids[0]) == native.process_cpus()


def test_the_driver_reads_avalon_pin_threads_when_it_loads(tmp_path):
    """A process started with AVALON_PIN_THREADS=0: its product helper may run anywhere."""
    import subprocess
    import sys
    code = (
        "import os, numpy as np, avalon\n"
        "from avalon.runtime import segments\n"
        "if segments.driver() is None: print('no driver'); raise SystemExit\n"
        "f = avalon.jit(lambda a, b: avalon.relu(a @ b) + a @ b, parallel=False)\n"
        "a = np.ones((256, 128), np.float32); b = np.ones((128, 256), np.float32)\n"
        "before = os.sched_getaffinity(0)\n"
        "segments.set_product_threads(2); f(a, b); segments.set_product_threads(1)\n"
        "tid = segments.driver().avl_product_helper_tid(0)\n"
        "print(sorted(os.sched_getaffinity(tid)) == sorted(before))\n")
    env = {**os.environ, "AVALON_PIN_THREADS": "0", "AVALON_C_DRIVER": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "no driver":
        pytest.skip("no C compiler: no segment driver")
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_a_compiler_started_from_a_thread_held_to_one_cpu_runs_on_every_cpu():
    """A compilation can finish inside a split call, in a thread held to one CPU;
    the compiler and its own processes (cc1, as, ld) inherit their starter's CPUs,
    and a CNN step's compilers, one per core, took 1.9 s instead of 1.3 s."""
    import sys
    before = os.sched_getaffinity(0)
    cpu = min(native.process_cpus())
    child = [sys.executable, "-c", "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); "
             "print(subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], "
             "capture_output=True, text=True).stdout.strip())"]
    os.sched_setaffinity(0, {cpu})
    try:
        out = native._run(child, native.CompilerInfo(path=sys.executable, version="-", argv=(sys.executable,)),
                          "affinity")
        assert os.sched_getaffinity(0) == {cpu}          # the thread's own CPUs back
    finally:
        os.sched_setaffinity(0, before)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [str(sorted(native.process_cpus()))] * 2   # and its children
