"""Every dependency of one avalon-* package on another admits the version the
other has in this repository: otherwise installing the packages together (pip,
with dependencies) fails, or picks up an unrelated distribution of that name
from the package index."""
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

PACKAGES = Path(__file__).resolve().parents[1] / "packages"


def projects(packages_dir: Path = PACKAGES) -> dict:
    """canonical name -> its [project] table, for every package under packages_dir."""
    found = {}
    for pyproject in sorted(packages_dir.glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        found[canonicalize_name(project["name"])] = project
    return found


def sibling_mismatches(found: dict) -> list[str]:
    """'a requires b<spec>, but b is <version>' for each sibling range excluding the sibling."""
    bad = []
    for name, project in found.items():
        for text in project.get("dependencies", []):
            requirement = Requirement(text)
            sibling = found.get(canonicalize_name(requirement.name))
            if sibling is None:
                continue
            version = Version(sibling["version"])
            if not requirement.specifier.contains(version, prereleases=True):
                bad.append(f"{name} requires {text!r}, but {sibling['name']} is {version}")
    return bad


def test_every_sibling_range_admits_the_siblings_version():
    found = projects()
    assert {"avalon-core", "avalon-layers", "avalon-zoo", "avalon-bench", "avalon-cuda"} <= set(found)
    assert sibling_mismatches(found) == []


def test_every_package_depends_on_siblings_by_a_range():
    for name, project in projects().items():
        for text in project.get("dependencies", []):
            requirement = Requirement(text)
            if canonicalize_name(requirement.name).startswith("avalon-"):
                assert requirement.specifier, f"{name} depends on {requirement.name} without a version range"


@pytest.mark.parametrize("spec, ok", [(">=0.1,<0.2", True), (">=0.2", False), ("<0.1", False), ("==0.1.0", True)])
def test_the_check_catches_a_range_that_excludes_the_sibling(spec, ok):
    found = {
        "avalon-core": {"name": "avalon-core", "version": "0.1.0", "dependencies": []},
        "avalon-layers": {"name": "avalon-layers", "version": "0.1.0",
                          "dependencies": [f"avalon-core{spec}", "numpy>=99"]},
    }
    mismatches = sibling_mismatches(found)
    assert (mismatches == []) is ok, mismatches
