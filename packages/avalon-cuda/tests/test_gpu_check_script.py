"""scripts/gpu_check.sh, the unattended check for a machine with a GPU: where no GPU
is usable it stops after its smoke test, saying why, with what it learned in $OUT."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avalon_cuda import gpu_available

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
ROOT = SCRIPT.parents[3]


@pytest.mark.skipif(gpu_available()[0], reason="a GPU is usable: the script would run in full")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_a_gpu_the_check_stops_after_its_smoke_test_saying_why(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "INSTALL": "0"}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "gpu_check: stopped in the setup (exit 4)" in done.stdout
    machine = (tmp_path / "out" / "machine.txt").read_text()
    assert "gpu_available: False" in machine and f"reason: {gpu_available()[1]}" in machine
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["machine.txt"]
