#!/usr/bin/env bash
# One unattended check of avalon-cuda on a machine with an NVIDIA GPU: the
# packages installed from this checkout, the avalon-cuda tests (the core's
# conformance suite on the GPU among them), then `avalon_bench --device cuda`
# for the CNN and the VAE. Everything it learns is written under $OUT
# (default ./gpu-check), at most seven files, so that a run cut short by its
# time limit still returns what it reached.
#
#   OUT=/tmp/gpu bash packages/avalon-cuda/scripts/gpu_check.sh
#
# Needs: python3 with numpy, pluggy, pytest, hypothesis, setuptools, CuPy and
# a CUDA build of PyTorch (no package is downloaded: it runs offline).
# Optional: AVALON_DATA naming a folder with Fashion-MNIST's four .gz files
# (else the bench uses synthetic images of its shape and says so).
# Time: about 8 minutes at most, set by TESTS_S and BENCH_S below.
set -u
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python3}
TESTS_S=${TESTS_S:-170}
BENCH_S=${BENCH_S:-280}
EPOCHS=${EPOCHS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export AVALON_CACHE_DIR=${AVALON_CACHE_DIR:-/tmp/avalon-gpu-check-cache}
started=$(date +%s)
stamp() { echo "== $(($(date +%s) - started)) s: $*"; }

machine="$OUT/machine.txt"
(
    stamp "machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    command -v nvcc && nvcc --version | tail -1
    command -v cc gcc || echo "no C compiler: the CPU side falls back to NumPy"
    "$PY" -c "import sys, numpy, cupy, torch; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    if [ "${INSTALL:-1}" != 0 ]; then     # INSTALL=0: the packages are installed already
        stamp "install"
        for p in avalon-core avalon-layers avalon-zoo avalon-cuda avalon-bench; do
            "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e "packages/$p" || exit 3
        done
    fi
    stamp "smoke"
    "$PY" - <<'PY' || exit 4
import numpy as np
import avalon
from avalon_cuda import gpu_available
ok, why = gpu_available()
print("gpu_available:", ok, "reason:", why)
assert ok, why
x = avalon.to_device(np.arange(12, dtype=np.float32).reshape(3, 4), "cuda")
f = avalon.jit(lambda a: (avalon.exp(a) * 2.0 + a).sum(axis=0))
got = avalon.to_device(f(x), "cpu")
ref = (np.exp(np.arange(12, dtype=np.float32).reshape(3, 4)) * 2 + np.arange(12, dtype=np.float32).reshape(3, 4)).sum(0)
np.testing.assert_allclose(got, ref, rtol=1e-5)
print("jit on cuda: ok", got)
PY
) > "$machine" 2>&1
status=$?
cat "$machine"
if [ $status -ne 0 ]; then
    echo "gpu_check: stopped in the setup (exit $status); see $machine"
    exit $status
fi

stamp "avalon-cuda tests (at most ${TESTS_S} s)" | tee "$OUT/tests.log"
timeout -k 10 "$TESTS_S" "$PY" -m pytest packages/avalon-cuda/tests -q -rfE -p no:randomly \
    -p no:cacheprovider --junitxml="$OUT/tests.xml" >> "$OUT/tests.log" 2>&1
echo "pytest exit: $?" >> "$OUT/tests.log"
tail -25 "$OUT/tests.log"

stamp "bench --device cuda, $EPOCHS epochs (at most ${BENCH_S} s)" | tee "$OUT/bench.log"
timeout -k 10 "$BENCH_S" "$PY" -m avalon_bench --device cuda --which cnn --epochs "$EPOCHS" \
    --torch-compile off --out "$OUT/bench-cnn" >> "$OUT/bench.log" 2>&1
echo "cnn exit: $?" >> "$OUT/bench.log"
left=$((BENCH_S - ($(date +%s) - started) + TESTS_S + 30))
[ $left -gt 60 ] || left=60
timeout -k 10 "$left" "$PY" -m avalon_bench --device cuda --which vae --epochs "$EPOCHS" \
    --torch-compile off --out "$OUT/bench-vae" >> "$OUT/bench.log" 2>&1
echo "vae exit: $?" >> "$OUT/bench.log"
rm -f "$OUT"/bench-*/results.png    # the tables say it; keeps the files under the count returned
tail -40 "$OUT/bench.log"
stamp "done"
