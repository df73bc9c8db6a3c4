"""How to install an Avalon package: the one phrase every error message and
hint uses.

Avalon's packages are installed from a clone of its repository: they are not
on the Python package index, where `avalon-core` is an unrelated project.
"""
from __future__ import annotations


def install_command(package: str, extra: str = "") -> str:
    """The pip command that installs `package` (a directory under packages/,
    as "avalon-cuda") editable from the repository root, with an optional extra."""
    target = f"packages/{package}" + (f"[{extra}]" if extra else "")
    return f'pip install -e "{target}"' if extra else f"pip install -e {target}"


def install_hint(package: str, extra: str = "") -> str:
    """`install_command` with where to run it."""
    return (f"install it from the root of a clone of the Avalon repository: "
            f"`{install_command(package, extra)}` (Avalon's packages are not on PyPI)")
