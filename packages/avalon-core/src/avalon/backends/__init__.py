"""Devices and the registry of backends that plugins provide.

    avalon.device("cpu"), avalon.device("cuda:0")
    avalon.to_device(model, "cuda")      # walks any object, as grad does
    avalon.best_available_device()
    avalon.backends()                    # what is installed, and whether usable
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DeviceError, at, user_location
from .. import tree
from .._install import install_hint
from .base import Backend

__all__ = ["Backend", "Device", "device", "to_device", "best_available_device", "backends",
           "backend_of", "get_backend", "manual_seed"]

# Device kinds whose backend lives in a package of the Avalon family.
KNOWN_PACKAGES = {"cpu": "avalon-core", "cuda": "avalon-cuda"}

_classes: dict[str, type] | None = None
_instances: dict[tuple[str, int], Backend] = {}
_type_cache: dict[type, type] = {}
_seed: int | None = None


def reset() -> None:
    """Forget collected backend classes (after plugins change); backend
    instances whose class is still registered afterwards are kept."""
    global _classes
    _classes = None
    _type_cache.clear()


def _backend_classes() -> dict[str, type]:
    global _classes
    if _classes is None:
        from ..plugins import call_each, report
        found: dict[str, type] = {}
        for plugin, classes in call_each("avalon_backends"):
            for cls in classes:
                if not (isinstance(cls, type) and issubclass(cls, Backend)):
                    report(plugin, f"avalon_backends returned {cls!r}, not a Backend subclass")
                    continue
                if cls.name in found and found[cls.name] is not cls:
                    report(plugin, f"backend {cls.name!r} is already provided by {found[cls.name].package}")
                    continue
                found[cls.name] = cls
                for t in cls.array_types:
                    tree.register_array_type(t)
        _classes = found
        for key in [k for k, b in _instances.items() if found.get(k[0]) is not type(b)]:
            del _instances[key]
    return _classes


@dataclass(frozen=True)
class Device:
    kind: str
    index: int = 0

    def __str__(self):
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"

    def __repr__(self):
        return f"device({str(self)!r})"

    @property
    def backend(self) -> Backend:
        return get_backend(self)


def device(spec="cpu") -> Device:
    """A device from 'cpu', 'cuda', 'cuda:1' or an existing Device."""
    if isinstance(spec, Device):
        d = spec
    elif isinstance(spec, str):
        kind, _, idx = spec.partition(":")
        if idx and not idx.isdigit():
            raise DeviceError(f"bad device {spec!r}: expected 'kind' or 'kind:index', as in 'cuda:0'")
        d = Device(kind.strip().lower(), int(idx) if idx else 0)
    else:
        raise DeviceError(f"bad device {spec!r}: give a string such as 'cpu' or 'cuda:0'")
    get_backend(d)  # validates
    return d


def get_backend(dev) -> Backend:
    d = dev if isinstance(dev, Device) else Device(*_parse(dev))
    b = _instances.get((d.kind, d.index))
    if b is not None:
        return b
    classes = _backend_classes()
    cls = classes.get(d.kind)
    if cls is None:
        pkg = KNOWN_PACKAGES.get(d.kind)
        hint = (install_hint(pkg) if pkg else
                "no known package provides it; a third-party backend plugin must register it "
                "in the 'avalon' entry-point group")
        raise DeviceError(f"unknown device kind {d.kind!r}: no installed backend provides it "
                          f"(installed: {', '.join(sorted(classes)) or 'none'}); {hint}")
    ok, why = cls.availability()
    if not ok:
        raise DeviceError(f"device {str(d)!r} is not available: {why}")
    b = cls(d.index)
    _instances[(d.kind, d.index)] = b
    return b


def _parse(spec):
    kind, _, idx = str(spec).partition(":")
    return kind, int(idx) if idx else 0


def backend_of(x) -> Backend:
    """The backend that owns array `x`."""
    t = type(x)
    cls = _type_cache.get(t)
    if cls is None:
        classes = _backend_classes()
        for c in sorted(classes.values(), key=lambda c: -c.priority):
            if t in c.array_types:
                cls = c
                break
        else:
            for c in sorted(classes.values(), key=lambda c: -c.priority):
                if isinstance(x, c.array_types):
                    cls = c
                    break
        if cls is None:
            raise DeviceError(f"{t.__module__}.{t.__qualname__} is not an array type of any installed backend "
                              f"({', '.join(sorted(classes)) or 'none installed'}){at(user_location())}; "
                              f"{tree.conversion_hint(x)}")
        _type_cache[t] = cls
    return get_backend(Device(cls.name, cls.device_index(x)))


def backend_of_args(arrays, opname):
    """The one backend all array arguments live on (NumPy scalars go along)."""
    backend = None
    for a in arrays:
        if isinstance(a, (np.generic,)):
            continue
        b = backend_of(a)
        if backend is None:
            backend = b
        elif b is not backend:
            raise DeviceError(f"{opname}: arguments live on different devices ({backend.device} and "
                              f"{b.device}){at(user_location())}; move them with avalon.to_device")
    if backend is None:
        backend = get_backend(Device("cpu"))
    return backend, [np.asarray(a) if isinstance(a, np.generic) else a for a in arrays]


def to_device(obj, dev):
    """A copy of `obj` (array, model, any nesting) with every array on `dev`."""
    target = get_backend(device(dev))

    def move(x):
        src = backend_of(x)
        if src is target:
            return x
        return target.asarray(src.to_host(x))
    return tree.tree_map(move, obj)


def best_available_device() -> Device:
    """The available device of highest priority (a GPU if one is usable, else the CPU)."""
    for cls in sorted(_backend_classes().values(), key=lambda c: -c.priority):
        if cls.availability()[0]:
            return Device(cls.name, 0)
    raise DeviceError("no backend is available; reinstall avalon-core, which provides the CPU backend")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    package: str
    available: bool
    reason: str

    def __str__(self):
        return f"{self.name:<8} {self.package:<16} {'available' if self.available else 'unavailable: ' + self.reason}"


def backends() -> list[BackendStatus]:
    """Every installed backend, whether it can be used, and why not."""
    out = []
    for name, cls in sorted(_backend_classes().items()):
        ok, why = cls.availability()
        out.append(BackendStatus(name, cls.package, ok, why))
    return out


def manual_seed(seed: int) -> None:
    """Seed every backend's random generator: random ops (dropout, random_normal),
    eager or compiled, repeat their draws after the same seed."""
    global _seed
    _seed = int(seed)
    for b in _instances.values():
        b.seed(current_seed(b))


def current_seed(backend) -> int | None:
    if _seed is None:
        return None
    return _seed + 7919 * backend.index
