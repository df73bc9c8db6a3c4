"""Layer sets: what plugins put into avalon.nn, avalon.nn.functional,
avalon.nn.utils, avalon.optim and the top-level avalon namespace."""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field

from .errors import AvalonError

NAMESPACES = ("nn", "functional", "utils", "optim", "toplevel")


@dataclass
class LayerSet:
    name: str
    package: str
    nn: dict = field(default_factory=dict)
    functional: dict = field(default_factory=dict)
    utils: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)
    toplevel: dict = field(default_factory=dict)


class LayerSetClash(AvalonError):
    """Two installed layer sets define the same name."""


_merged: dict | None = None


def reset() -> None:
    global _merged
    _merged = None


def merged() -> dict:
    """namespace -> {name: (object, layer set)} over every installed set."""
    global _merged
    if _merged is None:
        from .plugins import call_each, report
        out: dict = {ns: {} for ns in NAMESPACES}
        for plugin, sets in call_each("avalon_layer_sets"):
            for ls in sets:
                if not isinstance(ls, LayerSet):
                    report(plugin, f"avalon_layer_sets returned {ls!r}, not a LayerSet")
                    continue
                for ns in NAMESPACES:
                    table = out[ns]
                    for name, obj in getattr(ls, ns).items():
                        if name in table and table[name][0] is not obj:
                            other = table[name][1]
                            raise LayerSetClash(
                                f"layer sets {other.name!r} ({other.package}) and {ls.name!r} ({ls.package}) "
                                f"both define {_qual(ns, name)}; uninstall one of them or ask its author "
                                "to rename")
                        table[name] = (obj, ls)
        _merged = out
    return _merged


def _qual(ns, name):
    return {"nn": "avalon.nn.", "functional": "avalon.nn.functional.", "utils": "avalon.nn.utils.",
            "optim": "avalon.optim.", "toplevel": "avalon."}[ns] + name


def lookup(ns: str, name: str, module_name: str):
    table = merged()[ns]
    if name in table:
        return table[name][0]
    if name.startswith("_"):  # tools probing private attributes: no search for suggestions
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    raise AttributeError(f"module {module_name!r} has no attribute {name!r} ({_missing_hint(ns, name, module_name)})")


# Where a user reads what a layer set defines, and how PyTorch names map to Avalon's.
PORTING_GUIDE = "packages/avalon-layers/PORTING.md"
MAX_SUGGESTIONS = 5


def _missing_hint(ns: str, name: str, module_name: str) -> str:
    if not any(merged().values()):
        from ._install import install_hint
        return f"no layer set is installed: {install_hint('avalon-layers')}"
    parts = []
    close = close_names(name, _candidates(ns, module_name))
    if close:
        parts.append(f"did you mean {', '.join(close)}?")
    elsewhere = [_qual(other, name) for other in NAMESPACES
                 if other != ns and name in merged()[other]]
    if elsewhere:
        parts.append(f"{' and '.join(elsewhere)} exists")
    if not parts:
        parts.append(f"nothing close among the names it defines: see dir({module_name}), and "
                     f"{PORTING_GUIDE} for the PyTorch names")
    return "; ".join(parts)


def _candidates(ns: str, module_name: str) -> list[str]:
    """The names the module answers: its layer sets' and its own public ones."""
    found = set(merged()[ns])
    module = sys.modules.get(module_name)
    if module is not None:
        found |= {n for n in vars(module) if not n.startswith("_")}
    return sorted(found)


def _folded(name: str) -> str:
    """A name without case or underscores: `Relu`, `relu` and `ReLU` fold alike,
    as do `maxpool2d` and `max_pool2d`."""
    return name.replace("_", "").lower()


def close_names(name: str, candidates, limit: int = MAX_SUGGESTIONS) -> list[str]:
    """The candidates closest to `name`, best first, at most `limit`: those equal
    to it but for case and underscores, then difflib's close matches of the
    folded names, then of the names as written."""
    by_fold: dict[str, list[str]] = {}
    for candidate in candidates:
        by_fold.setdefault(_folded(candidate), []).append(candidate)
    found: list[str] = list(by_fold.get(_folded(name), []))
    for folded in difflib.get_close_matches(_folded(name), list(by_fold), n=limit, cutoff=0.6):
        found.extend(by_fold[folded])
    found.extend(difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.6))
    unique = list(dict.fromkeys(c for c in found if c != name))
    return unique[:limit]


def names(ns: str) -> list[str]:
    return sorted(merged()[ns])
