"""What the benchmark ran on: CPU, cores, memory, load, library versions, commit."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

from .worker import cpu_cores


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def load_average() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def uptime() -> str | None:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


#: versions() key of the BLAS Avalon's compiled code calls
AVALON_BLAS_KEY = "avalon BLAS"


def versions() -> dict:
    import numpy
    import torch

    import avalon
    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "avalon": avalon.__version__,
        "avalon-layers": _version("avalon-layers"),
        "avalon-zoo": _version("avalon-zoo"),
        "avalon-bench": _version("avalon-bench"),
        "matplotlib": _version("matplotlib"),
        "numpy BLAS": _numpy_blas(),
        AVALON_BLAS_KEY: _avalon_blas(),
        "git commit": _git_commit(),
    }


def _avalon_blas() -> str | None:
    """The BLAS Avalon's compiled CPU code calls (AVALON_BLAS; MKL when installed)."""
    from avalon.runtime.blas import generated_code_blas
    try:
        chosen = generated_code_blas()
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the run says what it could not load
        return f"unavailable ({e})"
    return chosen.name if chosen is not None else "none (products run as NumPy calls)"


def _numpy_blas() -> str | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in (pool.get("filepath") or ""):
            return f"{pool.get('internal_api')} {pool.get('version')}"
    return None


def machine() -> dict:
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor() or None,
        "cpu_flags_avx512f": "avx512f" in (_cpuinfo_field("flags") or "").split(),
        "cores": cpu_cores(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "executable": sys.executable,
    }
