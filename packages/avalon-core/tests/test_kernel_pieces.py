"""Elementwise kernels run in pieces across the segment driver's threads: the
kernel IR says which kernels may (`elementwise_extent`), the C renderer gives
those of at least PIECES_MIN_ELEMENTS a NAME_part(args, lo, hi) entry, and
the driver splits their loop across its product helpers when the calling
thread set product threads (the "BLAS on N threads" schedule), as it splits
large matrix products."""
import os
import subprocess
import sys

import numpy as np
import pytest

from avalon.kernel_ir import CRenderer, elementwise_extent, lower
from avalon.kernel_ir.render_c import PIECES_MIN_ELEMENTS, has_part
from avalon.testing.bodies import body_of

F32 = np.dtype(np.float32)


def _elementwise(n):
    return body_of([((n,), F32), ((n,), F32), ((), F32)],
                   lambda op, x, y, s: op("add", op("mul", op("exp", x), s), y))


def _bias_add(rows, cols):
    return body_of([((rows, cols), F32), ((cols,), F32)], lambda op, x, b: op("add", x, b))


def _row_sums(rows, cols):
    return body_of([((rows, cols), F32)], lambda op, x: op("sum", x, axes=(1,), keepdims=False))


def test_elementwise_extent_is_the_loop_of_a_flat_elementwise_kernel():
    assert elementwise_extent(lower(_elementwise(1000))) == 1000
    assert elementwise_extent(lower(body_of([((8, 125), F32), ((8, 125), F32)],
                                            lambda op, x, y: op("mul", x, y)))) == 1000


@pytest.mark.parametrize("body", [_bias_add(64, 100), _row_sums(64, 100)], ids=["broadcast", "reduction"])
def test_kernels_whose_elements_depend_on_their_position_have_no_extent(body):
    assert elementwise_extent(lower(body)) is None


def test_large_elementwise_kernels_get_a_range_entry_and_small_ones_do_not():
    big, small = lower(_elementwise(PIECES_MIN_ELEMENTS), name="big"), lower(_elementwise(1000), name="small")
    assert has_part(big) and not has_part(small)
    src = CRenderer().render_module([big, small])
    assert "void big_part(void* const* args, int64_t lo, int64_t hi)" in src
    assert "small_part" not in src
    part = src[src.index("void big_part"):]
    assert "const float* in0 = (const float*)args[0];" in part and "float* out = (float*)args[3];" in part
    assert "for (int64_t i0 = lo; i0 < hi; i0++) {" in part
    # the same statements as the whole kernel's loop
    whole = src[src.index("void big("):src.index("void big_part")]
    assert whole[whole.index("const float x0"):whole.index("}")] == part[part.index("const float x0"):part.index("}")]


_SPLIT = """
import numpy as np, avalon
from avalon.runtime import segments
from avalon.kernel_ir.render_c import PIECES_MIN_ELEMENTS
if segments.driver() is None:
    print("no driver"); raise SystemExit
n = PIECES_MIN_ELEMENTS * 3 + 7                 # pieces of unequal length
rng = np.random.default_rng(0)
x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
def two_kernels(x, y):                         # a segment: a run of two C kernels
    a = avalon.exp(x) * np.float32(0.5) + y
    return a, avalon.exp(a) * x
f = avalon.jit(two_kernels, parallel=False)
whole = [a.copy() for a in f(x, y)]
assert segments.driver().avl_product_helpers() == 0
segments.set_product_threads(2)
try:
    split = f(x, y)
finally:
    segments.set_product_threads(1)
want = np.exp(x) * np.float32(0.5) + y
print(segments.driver().avl_product_helpers(), all(np.array_equal(w, s) for w, s in zip(whole, split)),
      max(float(np.max(np.abs(split[0] - want))), float(np.max(np.abs(split[1] / (np.exp(want) * x) - 1)))))
"""


def test_the_driver_splits_a_large_elementwise_kernel_across_its_helpers():
    """In a fresh process: no product in the step, so a helper exists only if the
    elementwise kernel was split; the pieces compute exactly the whole."""
    env = {**os.environ, "AVALON_C_DRIVER": "1", "AVALON_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", _SPLIT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "no driver":
        pytest.skip("no C compiler: no segment driver")
    helpers, same, err = out.stdout.split()
    assert int(helpers) >= 1 and same == "True" and float(err) < 1e-5
