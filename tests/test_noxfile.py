"""The noxfile: package discovery in dependency order, and environments reused
between runs unless what they install changed. nox itself is not installed in
the test environment, so the noxfile is loaded against a stand-in `nox` module
that records what the sessions would do."""
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stand_in_nox() -> types.ModuleType:
    nox = types.ModuleType("nox")
    nox.options = types.SimpleNamespace()
    nox.Session = object
    nox.session = lambda func=None, **kwargs: func if func is not None else (lambda f: f)
    return nox


@pytest.fixture
def noxfile(monkeypatch):
    monkeypatch.setitem(sys.modules, "nox", _stand_in_nox())
    spec = importlib.util.spec_from_file_location("avalon_noxfile", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeSession:
    """Records installs instead of running pip; `fail_on` makes an install raise."""

    def __init__(self, location: Path, fail_on: str | None = None):
        self.virtualenv = types.SimpleNamespace(location=str(location))
        self.installs: list[tuple[str, ...]] = []
        self.logs: list[str] = []
        self.fail_on = fail_on

    def install(self, *args):
        if self.fail_on is not None and self.fail_on in args:
            raise RuntimeError("pip failed")
        self.installs.append(args)

    def log(self, message):
        self.logs.append(message)


def test_packages_are_found_and_ordered_by_their_dependencies(noxfile):
    order = noxfile.ordered_packages()
    assert sorted(order) == sorted(p.parent.name for p in (ROOT / "packages").glob("*/pyproject.toml"))
    assert order[0] == "avalon-core"
    assert order.index("avalon-layers") < order.index("avalon-zoo") < order.index("avalon-bench")


def test_environments_are_reused(noxfile):
    assert noxfile.nox.options.reuse_existing_virtualenvs is True


def test_a_second_install_is_skipped(noxfile, tmp_path):
    first = FakeSession(tmp_path)
    noxfile.install_packages(first)
    editable = [args[-1] for args in first.installs if "-e" in args]
    assert editable == [f"packages/{d}" for d in noxfile.ordered_packages()]
    assert "torch==2.13.0" in first.installs[0]
    second = FakeSession(tmp_path)
    noxfile.install_packages(second)
    assert second.installs == []
    assert any("Reusing" in m for m in second.logs)


def test_other_requirements_install_again(noxfile, tmp_path):
    noxfile.install_packages(FakeSession(tmp_path))
    with_charts = FakeSession(tmp_path)
    noxfile.install_packages(with_charts, "some-extra-requirement")
    assert "some-extra-requirement" in with_charts.installs[0]


def test_a_changed_pyproject_installs_again(noxfile, tmp_path, monkeypatch):
    packages = tmp_path / "packages"
    shutil.copytree(ROOT / "packages", packages,
                    ignore=lambda d, names: [n for n in names if n not in ("pyproject.toml",) and
                                             (Path(d) / n).is_file()])
    monkeypatch.setattr(noxfile, "PACKAGES_DIR", packages)
    venv = tmp_path / "venv"
    venv.mkdir()
    noxfile.install_packages(FakeSession(venv))
    pyproject = packages / "avalon-zoo" / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"matplotlib>=3.5",', '"matplotlib>=3.5",\n    "pillow",'))
    again = FakeSession(venv)
    noxfile.install_packages(again)
    assert "pillow" in again.installs[0]
    assert [a[-1] for a in again.installs if "-e" in a] == [f"packages/{d}" for d in noxfile.ordered_packages()]


def test_an_interrupted_install_is_not_taken_as_complete(noxfile, tmp_path):
    noxfile.install_packages(FakeSession(tmp_path))
    with pytest.raises(RuntimeError):
        noxfile.install_packages(FakeSession(tmp_path, fail_on="packages/avalon-zoo"), "new-requirement")
    retry = FakeSession(tmp_path)
    noxfile.install_packages(retry, "new-requirement")
    assert retry.installs, "the failed install must be redone"


def test_without_an_environment_of_its_own_it_always_installs(noxfile, tmp_path):
    session = FakeSession(tmp_path)
    session.virtualenv = types.SimpleNamespace()  # --no-venv: a PassthroughEnv has no location
    noxfile.install_packages(session)
    noxfile.install_packages(session)
    assert sum("-e" in a for a in session.installs) == 2 * len(noxfile.ordered_packages())


@pytest.mark.parametrize("posargs, out", [
    ([], "packages/avalon-bench/results/latest"),
    (["--epochs", "3"], "packages/avalon-bench/results/latest"),
    (["--quick"], "packages/avalon-bench/results/quick"),
    (["--which", "cnn", "--quick"], "packages/avalon-bench/results/quick"),
])
def test_a_quick_bench_run_writes_apart_from_the_full_runs(noxfile, posargs, out):
    args = noxfile.bench_args(posargs)
    assert args[:len(posargs)] == posargs and args[-2:] == ["--out", out]


def test_the_users_out_is_kept(noxfile):
    assert noxfile.bench_args(["--quick", "--out", "mine"]) == ["--quick", "--out", "mine"]
    assert noxfile.bench_args(["--out=mine"]) == ["--out=mine"]


def test_nox_no_install_leaves_no_stamp(noxfile, tmp_path):
    skipped = FakeSession(tmp_path)
    skipped._runner = types.SimpleNamespace(global_config=types.SimpleNamespace(no_install=True))
    noxfile.install_packages(skipped)  # nox -R: its installs do nothing in a reused environment
    later = FakeSession(tmp_path)
    noxfile.install_packages(later)
    assert later.installs, "an install nox skipped must not count as done"


def test_the_bench_byte_compiles_every_package_as_an_install_would(noxfile):
    class Recorder:
        def __init__(self):
            self.runs = []

        def run(self, *args, **kwargs):
            self.runs.append(args)
    session = Recorder()
    noxfile._compile_bytecode(session)
    (args,) = session.runs
    assert args[:3] == ("python", "-m", "compileall")
    compiled = {Path(a).parent.name for a in args[3:] if not a.startswith("-")}
    assert compiled == {p.parent.name for p in (ROOT / "packages").glob("*/pyproject.toml")}
