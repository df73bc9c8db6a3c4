"""Nox sessions for the Avalon monorepo.

    python3 -m nox -s tests      # every package's tests and the root tests/
    python3 -m nox -s bench      # benchmarks (bench_cnn, bench_vae: one each)

The package list is every directory under packages/ that has a pyproject.toml,
installed in dependency order worked out from the pyprojects themselves.

Environments are reused between runs: a session installs only when its
install stamp (a hash of what it installs: the requirements, every package's
pyproject.toml and this noxfile) differs from the one its environment
recorded. The packages are installed editable, so code changes need no
reinstall; a changed pyproject or requirement reinstalls. New releases of
unpinned requirements (numpy, ...) are not picked up by a reused environment:
`nox -N` (`--no-reuse-existing-virtualenvs`) rebuilds it from scratch.

Each session's environment holds every package and its requirements, so
`.nox/tests/bin/python` (or `.nox/bench/bin/python`) is a Python with Avalon
installed once a session has run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import nox

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

nox.options.sessions = ["tests"]
# Reuse each session's environment (torch makes it 1.1 GB, about 1.5 min to
# build); install_packages() decides by its stamp whether to install again.
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
PACKAGES_DIR = ROOT / "packages"

# Third-party requirements shared by every session. torch is the reference the
# tests and the benchmarks compare against. setuptools builds the editable
# installs without build isolation (70.1 and later need no separate `wheel`).
BASE_REQUIREMENTS = [
    "setuptools>=70.1",
    "numpy",
    "pluggy",
    "pytest",
    "hypothesis",
    "torch==2.13.0",
    "tqdm",
    "threadpoolctl",
    # avalon-core's `mkl` extra: the BLAS its compiled CPU code calls when installed
    # (avalon.runtime.blas), so the tests and the benchmarks run what users get
    "mkl>=2024; platform_machine == 'x86_64' and sys_platform == 'linux'",
]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_project(pyproject: Path) -> tuple[str, list[str]]:
    """Return (name, dependency requirement strings) of a pyproject.toml."""
    text = pyproject.read_text(encoding="utf-8")
    if tomllib is not None:
        project = tomllib.loads(text)["project"]
        return project["name"], list(project.get("dependencies", []))
    section = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if section is None:
        raise ValueError(f"no [project] table in {pyproject}")
    body = section.group(1)
    name = re.search(r'^name\s*=\s*"([^"]+)"', body, re.M)
    if name is None:
        raise ValueError(f"no project name in {pyproject}")
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", body, re.M | re.S)
    return name.group(1), re.findall(r'"([^"]+)"', deps.group(1)) if deps else []


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return _canonical(match.group(1))


def ordered_packages() -> list[str]:
    """Package directory names under packages/, dependencies first.

    A topological sort of the sibling dependencies. Among packages that are
    ready at the same time, the one more siblings depend on (transitively)
    goes first, then the one with fewer sibling dependencies, then by name,
    so the order is stable.
    """
    dirs = {}  # canonical project name -> directory name
    requires = {}  # canonical project name -> sibling names it depends on
    for pyproject in sorted(PACKAGES_DIR.glob("*/pyproject.toml")):
        name, deps = _read_project(pyproject)
        dirs[_canonical(name)] = pyproject.parent.name
        requires[_canonical(name)] = {_requirement_name(d) for d in deps}
    for name in requires:
        requires[name] &= dirs.keys()

    def closure(name: str, edges: dict[str, set[str]]) -> set[str]:
        found: set[str] = set()
        stack = list(edges[name])
        while stack:
            other = stack.pop()
            if other not in found:
                found.add(other)
                stack.extend(edges[other])
        return found

    required_by = {n: {o for o, deps in requires.items() if n in deps} for n in requires}
    rank = {
        name: (-len(closure(name, required_by)), len(closure(name, requires)), name)
        for name in requires
    }
    order: list[str] = []
    pending = dict(requires)
    while pending:
        ready = [name for name, deps in pending.items() if deps <= set(order)]
        if not ready:
            raise RuntimeError(f"dependency cycle among packages: {sorted(pending)}")
        ready.sort(key=rank.__getitem__)
        order.append(ready[0])
        del pending[ready[0]]
    return [dirs[name] for name in order]


def declared_requirements() -> list[str]:
    """The requirements the packages' pyprojects declare on distributions outside
    packages/ (matplotlib for avalon-bench's charts, ...), each once, in order."""
    projects = [_read_project(p) for p in sorted(PACKAGES_DIR.glob("*/pyproject.toml"))]
    siblings = {_canonical(name) for name, _ in projects}
    found: list[str] = []
    for _, deps in projects:
        found.extend(d for d in deps if _requirement_name(d) not in siblings and d not in found)
    return found


def install_packages(session: nox.Session, *extra: str) -> None:
    """Install the third-party requirements (shared, declared by the packages, and
    `extra`), then every package editable (without dependencies: all are here).

    Skipped when the session's environment already holds exactly this
    install (see `install_stamp`)."""
    requirements = [*BASE_REQUIREMENTS, *declared_requirements(), *extra]
    stamp_file = _stamp_file(session)
    stamp = install_stamp(requirements)
    if stamp_file is not None:
        if _read_stamp(stamp_file) == stamp:
            session.log(f"Reusing the installed environment (install stamp {stamp[:12]} unchanged)")
            return
        stamp_file.unlink(missing_ok=True)  # an interrupted install must not look complete
    session.install(*requirements)
    for directory in ordered_packages():
        session.install(
            "--no-deps", "--no-build-isolation", "-e", f"packages/{directory}"
        )
    if stamp_file is not None and not _installs_skipped(session):
        stamp_file.write_text(stamp + "\n", encoding="utf-8")


# Written into a session's environment after a complete install.
STAMP_NAME = "avalon-install.stamp"


def install_stamp(requirements: list[str]) -> str:
    """A hash of everything an install depends on: the requirement strings, the
    package directories with their pyproject.toml contents (names, versions,
    dependencies, entry points), and this noxfile (how things are installed),
    so a change to any of them reinstalls. Package sources are editable
    installs: not hashed."""
    pyprojects = {
        path.parent.name: path.read_text(encoding="utf-8")
        for path in sorted(PACKAGES_DIR.glob("*/pyproject.toml"))
    }
    content = {
        "requirements": requirements,
        "pyprojects": pyprojects,
        "noxfile": Path(__file__).read_text(encoding="utf-8"),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _stamp_file(session: nox.Session) -> Path | None:
    """Where the session's environment records its install; None without an
    environment of its own (`--no-venv`), which then always installs."""
    location = getattr(session.virtualenv, "location", None)
    return Path(location) / STAMP_NAME if location else None


def _installs_skipped(session: nox.Session) -> bool:
    """nox -R / --no-install: session.install does nothing in a reused
    environment, so what it holds is not known to match the stamp."""
    config = getattr(getattr(session, "_runner", None), "global_config", None)
    return bool(getattr(config, "no_install", False))


def _read_stamp(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


@nox.session
def tests(session: nox.Session) -> None:
    """Run every package's tests and the root tests/ with pytest."""
    install_packages(session)
    _install_mpi(session)
    paths = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGES_DIR.glob("*/tests")) + [ROOT / "tests"]
        if path.is_dir()
    ]
    # --rootdir: otherwise pytest takes the first package's directory (its
    # pyproject.toml) as rootdir. importlib import mode: several packages have
    # test modules with the same file name (tests/test_package.py), which the
    # default import mode cannot load side by side.
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        "-rs",
        f"--rootdir={ROOT}",
        "--import-mode=importlib",
        *paths,
        *session.posargs,
    )


def _install_mpi(session: nox.Session) -> None:
    """Open MPI (apt-get, as root, when mpirun is missing) and mpi4py, for the
    multi-process tests of avalon.distributed (tests/test_distributed.py).
    Never fatal: without them those tests skip, saying what is missing."""
    session.run("sh", "packages/avalon-core/scripts/install_open_mpi.sh", external=True,
                success_codes=list(range(256)))
    if shutil.which("mpirun"):
        session.install("mpi4py")


# The benchmarks also draw their charts (matplotlib: the field's standard plotting library).
BENCH_REQUIREMENTS = ["matplotlib"]
BENCH_OUT = "packages/avalon-bench/results/latest"
# Quick (smoke) runs go apart, so they never replace the last full run's results.
BENCH_QUICK_OUT = "packages/avalon-bench/results/quick"


def bench_args(posargs: list[str]) -> list[str]:
    """The benchmark's arguments: the user's (after `--`), plus --out where they
    gave none: results/quick for a --quick run, results/latest otherwise."""
    args = list(posargs)
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", BENCH_QUICK_OUT if "--quick" in args else BENCH_OUT]
    return args


def _install_fashion_mnist(session: nox.Session) -> None:
    """The benchmarks' real data, Fashion-MNIST, through the zoo's installer when
    running as root with apt-get.  Never fatal: without the data the benchmarks
    train on synthetic data of the same shape, and say so."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not (as_root and shutil.which("apt-get")):
        session.log("Fashion-MNIST is not installed by this session (needs root and apt-get); "
                    "the benchmarks use it if present, else synthetic data")
        return
    session.run("bash", "packages/avalon-zoo/scripts/install_fashion_mnist.sh", external=True,
                success_codes=list(range(256)))


def _bench(session: nox.Session, which: str) -> None:
    install_packages(session, *BENCH_REQUIREMENTS)
    _install_fashion_mnist(session)
    _compile_bytecode(session)
    args = bench_args(session.posargs)  # e.g. nox -s bench -- --epochs 3
    session.run("python", "-m", "avalon_bench", "--which", which, *args)


def _compile_bytecode(session: nox.Session) -> None:
    """Byte-compile the packages' sources, as installing a wheel does: the editable
    installs are otherwise compiled at each import (every import when
    PYTHONDONTWRITEBYTECODE is set), and the modules a first compilation imports
    would count 10-15 ms into Avalon's compile figure."""
    sources = [str(p) for p in sorted(PACKAGES_DIR.glob("*/src"))]
    session.run("python", "-m", "compileall", "-q", *sources, silent=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Run all benchmarks against PyTorch."""
    _bench(session, "all")


@nox.session
def bench_cnn(session: nox.Session) -> None:
    """Run the CNN benchmark against PyTorch."""
    _bench(session, "cnn")


@nox.session
def bench_vae(session: nox.Session) -> None:
    """Run the VAE benchmark against PyTorch."""
    _bench(session, "vae")
