"""Code objects of the Python source Avalon generates (a compiled step's module,
each C kernel's wrapper), cached on disk beside the kernels.

Compiling that source costs 0.1-2 ms a module, and a step compiles dozens:
about 10 ms of a step's first call when its kernels are already in the disk
cache.  `code_of` loads the code object with marshal instead (tens of
microseconds), as Python's own .pyc files do.

- Key: the sha256 of the interpreter's bytecode magic number (a code object is
  only valid for the Python that made it), the file name the code reports in
  tracebacks and the source.
- Entry: `cache_dir()/python/<key>.code`, the marshalled code object, checked
  and written as every `disk_memo.DiskMemo` entry: one that is damaged or does
  not load is compiled again and rewritten; without a writable cache directory
  the source is compiled in memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import marshal
from functools import lru_cache

from .disk_memo import DiskMemo

SUBDIRECTORY = "python"
_MEMO = DiskMemo(SUBDIRECTORY, ".code", marshal.dumps, marshal.loads)


@lru_cache(maxsize=1024)
def code_of(source: str, filename: str):
    """The code object of `source` compiled in "exec" mode as `filename`."""
    key = hashlib.sha256(importlib.util.MAGIC_NUMBER + filename.encode() + b"\0" + source.encode()).hexdigest()
    found, code = _MEMO.get(key)
    if not found:
        code = compile(source, filename, "exec")
        _MEMO.put(key, code)
    return code
