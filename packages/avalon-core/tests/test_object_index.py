"""Kernels found in shared objects that other build batches made (backends.cpu_native's
index of objects): a batch of kernels built before, in other company, is loaded and
not compiled; a missing, damaged or wrong object is compiled again."""
import os

import numpy as np
import pytest

from avalon.backends import cpu_native, get_backend
from avalon.runtime import native
from avalon.testing.bodies import body_of

F32 = np.dtype(np.float32)
pytestmark = pytest.mark.skipif(not native.available(), reason="no usable C compiler")


def _body(scale):
    return body_of([((4, 8), F32), ((4, 8), F32)],
                   lambda o, x, y: o("add", o("mul", o("exp", x), (scale, F32)), y))


def _expected(scale, x, y):
    return np.exp(x) * np.float32(scale) + y


@pytest.fixture
def fresh_process(tmp_path, monkeypatch):
    """An empty disk cache, and a function forgetting what this process built and lowered."""
    monkeypatch.setenv("AVALON_CACHE_DIR", str(tmp_path))

    def forget():
        cpu_native.build_pending()
        with cpu_native._lock:
            cpu_native._built.clear()
        cpu_native._REMEMBERED.clear()
        cpu_native._LOWERED.clear()
        cpu_native._BODY_KERNELS.clear()
        native._reset_for_tests()
    forget()
    yield forget
    forget()


def _indexed_objects(cache) -> set:
    """The shared objects the index names."""
    return {cache / f"{entry.read_bytes()[:64].decode()}.so" for entry in (cache / "objects").glob("*.key")}


def _run(scales):
    fns = cpu_native.compile_fused_many([_body(s) for s in scales], get_backend("cpu"))
    x, y = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    for s, fn in zip(scales, fns):
        np.testing.assert_allclose(fn(x, y), _expected(s, x, y), rtol=1e-6)


def test_a_kernel_built_in_another_batch_is_loaded_not_compiled(fresh_process):
    _run([2.0, 3.0])
    fresh_process()
    runs = native.compiler_runs()
    _run([3.0])                 # one kernel of that batch, alone
    _run([2.0])
    assert native.compiler_runs() == runs
    fresh_process()
    _run([3.0, 2.0, 5.0])       # one kernel new: the batch compiles
    assert native.compiler_runs() == runs + 1


def test_kernels_of_several_earlier_batches_load_from_their_objects(fresh_process):
    _run([2.0])
    fresh_process()
    _run([3.0])
    fresh_process()
    runs = native.compiler_runs()
    _run([3.0, 2.0])
    assert native.compiler_runs() == runs


@pytest.mark.parametrize("damage", ["removed", "garbled"])
def test_an_object_gone_or_damaged_is_compiled_again(fresh_process, tmp_path, damage):
    _run([2.0, 3.0])
    (obj,) = _indexed_objects(tmp_path)
    if damage == "removed":
        obj.unlink()
    else:
        # a new file under the name: this process has the old one mapped, and writing
        # into a mapped library changes the code it runs (its exit handlers crash)
        data = bytearray(obj.read_bytes())
        data[len(data) // 2] ^= 0x40
        garbled = obj.with_suffix(".tmp")
        garbled.write_bytes(bytes(data))
        os.replace(garbled, obj)
    fresh_process()
    runs = native.compiler_runs()
    _run([3.0])
    assert native.compiler_runs() == runs + 1


def test_an_index_entry_naming_an_object_without_the_kernel_is_not_trusted(fresh_process, tmp_path):
    _run([2.0])
    (first,) = _indexed_objects(tmp_path)
    fresh_process()
    _run([3.0])
    for entry in (tmp_path / "objects").glob("*.key"):
        cpu_native._OBJECTS.put(entry.name[:-4], first.name[:-3])     # every kernel "is in" the first
    fresh_process()
    runs = native.compiler_runs()
    _run([3.0, 2.0])
    assert native.compiler_runs() == runs + 1
