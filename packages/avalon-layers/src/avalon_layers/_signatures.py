"""Signatures of avalon-layers' stable API, and the snapshot that guards them.

A stable symbol's signature may change only on purpose: tests/test_stability.py
compares the live signatures with the committed snapshot
``tests/stable_signatures.json``.  After a deliberate change, record it in the
newest section of CHANGELOG.md (naming the symbol, e.g. ``avalon.nn.Linear``)
and rewrite the snapshot with

    python -m avalon_layers._signatures --update

which refuses to record a changed or removed symbol that the newest CHANGELOG
section does not mention.  ``--check`` prints the differences and exits 1 if
there are any; ``--table`` prints the README's stability table.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

from . import registry

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = PACKAGE_ROOT / "tests" / "stable_signatures.json"
CHANGELOG = PACKAGE_ROOT / "CHANGELOG.md"

_PREFIX = registry.PREFIXES
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # default values printed with their id change every run


def _loaded_registry():
    from . import _load_all  # noqa: F401  (importing every module fills the registry)
    return registry


class _Raw:
    """Prints a string annotation unquoted: modules with and without
    `from __future__ import annotations` then give the same text."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _unquoted(annotation):
    return _Raw(annotation) if isinstance(annotation, str) else annotation


def _signature_text(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "<no signature>"
    sig = sig.replace(parameters=[p.replace(annotation=_unquoted(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=_unquoted(sig.return_annotation))
    return _ADDRESS.sub("", str(sig))


def _method_entries(cls, stable_classes) -> dict:
    """Public methods and properties of cls, including those inherited from
    classes that are not themselves stable exports (those have their own entry)."""
    out = {}
    for base in reversed(cls.__mro__):
        if base is object or (base is not cls and base in stable_classes):
            continue
        for name, attr in vars(base).items():
            if name.startswith("_"):
                continue
            if isinstance(attr, property):
                out[name] = "<property>"
            elif isinstance(attr, (staticmethod, classmethod)):
                out[name] = f"{type(attr).__name__} {_signature_text(attr.__func__)}"
            elif inspect.isfunction(attr):
                out[name] = _signature_text(attr)
    return dict(sorted(out.items()))


def resolve(reg, ns: str, name: str):
    """The exported object: a dotted name ("init.normal_") is an attribute of an
    exported module (avalon.nn.init)."""
    head, *rest = name.split(".")
    obj = reg.EXPORTS[ns][head]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _entry(obj, component, stable_classes) -> dict:
    if inspect.ismodule(obj):
        return {"component": component, "kind": "module", "signature": f"<module {obj.__name__}>"}
    if inspect.isclass(obj):
        return {"component": component, "kind": "class", "signature": _signature_text(obj),
                "methods": _method_entries(obj, stable_classes)}
    if callable(obj):
        return {"component": component, "kind": "function", "signature": _signature_text(obj)}
    return {"component": component, "kind": type(obj).__name__, "signature": repr(obj)}


def live_signatures() -> dict:
    """{qualified name: entry} for every stable symbol exported by avalon-layers."""
    reg = _loaded_registry()
    stable = [(ns, name) for (ns, name), (_, level) in reg.LEVELS.items() if level == registry.STABLE]
    objects = {(ns, n): resolve(reg, ns, n) for ns, n in stable}
    stable_classes = {obj for obj in objects.values() if inspect.isclass(obj)}
    out = {}
    for (ns, name), obj in objects.items():
        component, _ = reg.LEVELS[(ns, name)]
        out[_PREFIX[ns] + name] = _entry(obj, component, stable_classes)
    return dict(sorted(out.items()))


def read_snapshot(path: Path = SNAPSHOT) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))["symbols"]


def differences(snapshot: dict, live: dict) -> dict:
    """{"changed": [...], "removed": [...], "added": [...]} qualified names."""
    return {"changed": sorted(k for k in snapshot.keys() & live.keys() if snapshot[k] != live[k]),
            "removed": sorted(snapshot.keys() - live.keys()),
            "added": sorted(live.keys() - snapshot.keys())}


def describe(snapshot: dict, live: dict, diff: dict) -> str:
    lines = []
    for name in diff["changed"]:
        lines.append(f"  changed: {name}")
        old, new = snapshot[name], live[name]
        for field in ("component", "kind", "signature"):
            if old.get(field) != new.get(field):
                lines.append(f"      {field}: {old.get(field)} -> {new.get(field)}")
        old_m, new_m = old.get("methods", {}), new.get("methods", {})
        for m in sorted(old_m.keys() | new_m.keys()):
            if old_m.get(m) != new_m.get(m):
                lines.append(f"      .{m}: {old_m.get(m, '<absent>')} -> {new_m.get(m, '<absent>')}")
    lines += [f"  removed: {name}" for name in diff["removed"]]
    lines += [f"  added (not in the snapshot yet): {name}" for name in diff["added"]]
    return "\n".join(lines)


def newest_changelog_section(path: Path = CHANGELOG) -> str:
    """Text of the first '## ' section of the CHANGELOG (the release being prepared)."""
    text = Path(path).read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    return sections[1] if len(sections) > 1 else ""


def undocumented(diff: dict, changelog_section: str) -> list[str]:
    """Changed or removed symbols that the newest CHANGELOG section does not name."""
    return [n for n in diff["changed"] + diff["removed"] if n not in changelog_section]


def write_snapshot(live: dict, path: Path = SNAPSHOT) -> None:
    doc = {"about": "Signatures of avalon-layers' stable symbols; regenerate on purpose with "
                    "`python -m avalon_layers._signatures --update` (see avalon_layers/_signatures.py)",
           "symbols": live}
    Path(path).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def stability_table() -> str:
    """The README's stability table: component -> level, and for "mostly
    stable" components, their experimental symbols."""
    reg = _loaded_registry()
    rows = ["| Component | Level | Experimental symbols |", "| --- | --- | --- |"]
    for component, level in reg.COMPONENTS.items():
        names = sorted(_PREFIX[ns] + n for (ns, n), (c, lvl) in reg.LEVELS.items()
                       if c == component and lvl == registry.EXPERIMENTAL)
        listed = ", ".join(f"`{n}`" for n in names) if level == "mostly stable" else ""
        rows.append(f"| {component} | {level} | {listed} |".replace("|  |", "| |"))
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avalon_layers._signatures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update", action="store_true", help="rewrite the snapshot with the live signatures")
    mode.add_argument("--check", action="store_true", help="report differences; exit 1 if any")
    mode.add_argument("--table", action="store_true", help="print the README stability table")
    parser.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    parser.add_argument("--changelog", type=Path, default=CHANGELOG)
    args = parser.parse_args(argv)
    if args.table:
        print(stability_table())
        return 0
    live = live_signatures()
    old = read_snapshot(args.snapshot) if args.snapshot.exists() else {}
    diff = differences(old, live)
    if not any(diff.values()):
        print(f"{args.snapshot}: up to date ({len(live)} stable symbols)")
        return 0
    print(describe(old, live, diff))
    if args.check:
        return 1
    missing = undocumented(diff, newest_changelog_section(args.changelog))
    if missing:
        print(f"refusing to update: the newest section of {args.changelog} does not mention "
              + ", ".join(missing), file=sys.stderr)
        return 1
    write_snapshot(live, args.snapshot)
    print(f"{args.snapshot}: rewritten ({len(live)} stable symbols)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
