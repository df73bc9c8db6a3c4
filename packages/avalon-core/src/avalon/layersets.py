"""Layer sets: what plugins put into avalon.nn, avalon.nn.functional,
avalon.nn.utils, avalon.optim and the top-level avalon namespace."""
from __future__ import annotations

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
    hint = ("no layer set is installed: pip install avalon-layers" if not any(merged().values())
            else f"the installed layer sets define: {', '.join(sorted(table)[:12])}...")
    raise AttributeError(f"module {module_name!r} has no attribute {name!r} ({hint})")


def names(ns: str) -> list[str]:
    return sorted(merged()[ns])
