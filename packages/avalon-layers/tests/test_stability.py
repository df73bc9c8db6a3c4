"""Stability guarantees of avalon-layers: every exported symbol has a level,
experimental ones warn once, stable signatures change only on purpose (the
committed snapshot plus a CHANGELOG entry), and the README's table is the
registry's."""
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import avalon
from avalon_layers import _signatures, registry

PACKAGE = Path(__file__).resolve().parents[1]
SNAPSHOT = PACKAGE / "tests" / "stable_signatures.json"
HOW_TO_UPDATE = (
    "If the change is deliberate: name each changed or removed symbol (e.g. avalon.nn.Linear) in the newest "
    "section of packages/avalon-layers/CHANGELOG.md, then run `python -m avalon_layers._signatures --update` "
    "and commit tests/stable_signatures.json. If it is not deliberate, restore the old signature: stable "
    "symbols keep their API.")


@pytest.fixture(scope="module")
def reg():
    return _signatures._loaded_registry()


def _public(qualname):
    """The object reached through the public namespaces (avalon.nn.X, ...)."""
    import avalon.nn.functional  # noqa: F401
    import avalon.optim  # noqa: F401
    obj = avalon
    for part in qualname.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_every_exported_symbol_has_a_level_consistent_with_its_component(reg):
    exported = [(ns, n) for ns in registry.NAMESPACES for n in reg.EXPORTS[ns]]
    assert exported
    for key in exported:
        assert key in reg.LEVELS, f"{key} is exported without a stability level"
    for (ns, name), (component, level) in reg.LEVELS.items():
        assert component in registry.COMPONENTS, (ns, name, component)
        assert level in (registry.STABLE, registry.EXPERIMENTAL), (ns, name, level)
        if registry.COMPONENTS[component] != "mostly stable":
            assert level == registry.COMPONENTS[component], f"{ns}.{name}: {level} in a {component} component"
        obj = _signatures.resolve(reg, ns, name)
        if not inspect.ismodule(obj):  # modules (avalon.nn.init) carry no attributes of their own
            assert getattr(obj, "__avalon_stability__", level) == level, (ns, name)


def test_every_exported_symbol_is_reachable_from_the_public_namespaces(reg):
    for qualname in avalon.stability()["symbols"]:
        assert _public(qualname) is not None, qualname


def test_stability_returns_the_whole_table(reg):
    table = avalon.stability()
    assert table["components"] == registry.COMPONENTS
    symbols = table["symbols"]
    assert len(symbols) == len(reg.LEVELS)
    assert symbols["avalon.fit"] == ("Fitting API", "experimental")
    assert symbols["avalon.save"] == ("Checkpoints", "stable")
    assert symbols["avalon.load"] == ("Checkpoints", "stable")
    assert symbols["avalon.stability"] == ("Stability API", "stable")
    assert symbols["avalon.nn.Module"] == ("Basic layers", "stable")


def test_experimental_symbols_warn_exactly_once_per_process(reg):
    # modules (avalon.metrics) do not warn themselves: their functions do, and are listed on their own
    experimental = sorted(q for q, (_, level) in avalon.stability()["symbols"].items()
                          if level == "experimental" and not inspect.ismodule(_public(q)))
    assert "avalon.fit" in experimental
    # A fresh interpreter: this test process may have warned already.  Each symbol is
    # called three times (bad arguments are fine: the warning comes first).
    code = textwrap.dedent("""
        import json, sys, warnings
        import avalon, avalon.nn, avalon.nn.functional, avalon.optim
        from avalon_layers.registry import ExperimentalWarning
        out = {}
        for qualname in json.loads(sys.argv[1]):
            obj = avalon
            for part in qualname.split(".")[1:]:
                obj = getattr(obj, part)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    try:
                        obj()
                    except Exception:
                        pass
            out[qualname] = [str(w.message) for w in caught if issubclass(w.category, ExperimentalWarning)]
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code, json.dumps(experimental)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    warned = json.loads(r.stdout.strip().splitlines()[-1])
    by_object = {}
    for qualname in experimental:  # aliases share one object and one warning
        by_object.setdefault(id(_public(qualname)), []).append(qualname)
    for names in by_object.values():
        messages = [m for q in names for m in warned[q]]
        assert len(messages) == 1, f"{names}: {messages}"
        assert "is experimental" in messages[0] and any(q in messages[0] for q in names), messages


def test_stable_symbols_do_not_warn(tmp_path):
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import numpy as np, avalon
        avalon.save({"w": np.zeros(2)}, "ck.npz"); avalon.load("ck.npz"); avalon.stability()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_stable_signatures_match_the_committed_snapshot():
    snapshot = _signatures.read_snapshot(SNAPSHOT)
    live = _signatures.live_signatures()
    diff = _signatures.differences(snapshot, live)
    assert not any(diff.values()), ("stable API differs from tests/stable_signatures.json:\n"
                                    + _signatures.describe(snapshot, live, diff) + "\n" + HOW_TO_UPDATE)


def test_the_snapshot_covers_methods_and_the_update_needs_a_changelog_entry(tmp_path):
    snapshot = _signatures.read_snapshot(SNAPSHOT)
    assert snapshot["avalon.save"]["signature"] == "(model_or_state_dict, path) -> None"
    assert "state_dict" in snapshot["avalon.nn.Module"]["methods"]
    # Simulate a changed signature: --update refuses until the CHANGELOG names the symbol.
    edited = dict(snapshot, **{"avalon.load": dict(snapshot["avalon.load"], signature="(path)")})
    snap = tmp_path / "snap.json"
    snap.write_text(json.dumps({"symbols": edited}))
    log = tmp_path / "CHANGELOG.md"
    log.write_text("# Changelog\n\n## [0.2.0]\n\n- nothing about it\n\n## [0.1.0]\n\n- avalon.load added\n")
    assert _signatures.main(["--check", "--snapshot", str(snap)]) == 1
    assert _signatures.main(["--update", "--snapshot", str(snap), "--changelog", str(log)]) == 1
    assert _signatures.read_snapshot(snap)["avalon.load"]["signature"] == "(path)"
    log.write_text("# Changelog\n\n## [0.2.0]\n\n- avalon.load takes a model\n\n## [0.1.0]\n")
    assert _signatures.main(["--update", "--snapshot", str(snap), "--changelog", str(log)]) == 0
    assert _signatures.read_snapshot(snap) == _signatures.live_signatures()


def _readme_table():
    text = (PACKAGE / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Stability\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Stability' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    table = {}
    for line in rows[2:]:  # header and separator first
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        table[cells[0]] = (cells[1], set(re.findall(r"`([^`]+)`", cells[2])) if len(cells) > 2 else set())
    return table


def test_the_readme_stability_table_matches_the_registry(reg):
    table = _readme_table()
    assert {c: level for c, (level, _) in table.items()} == registry.COMPONENTS, (
        "README.md's stability table differs from registry.COMPONENTS; print the current table with "
        "`python -m avalon_layers._signatures --table`")
    for component, level in registry.COMPONENTS.items():
        if level == "mostly stable":
            expected = {q for q, (c, lvl) in avalon.stability()["symbols"].items()
                        if c == component and lvl == "experimental"}
            assert table[component][1] == expected, (
                f"README.md must list the experimental symbols of {component}; print the current table with "
                "`python -m avalon_layers._signatures --table`")


def test_the_readme_example_runs(tmp_path):
    text = (PACKAGE / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    code = "\n".join(blocks[:2]) + "\nprint('accuracy', history['val_accuracy'][-1])\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) >= 0.9
    assert (tmp_path / "net.npz").is_file()
