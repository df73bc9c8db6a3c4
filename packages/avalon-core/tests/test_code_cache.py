"""The disk cache of generated Python's code objects (avalon.runtime.code_cache):
a hit compiles nothing, a damaged entry is compiled again and rewritten, a
cache directory that cannot be written falls back to compiling in memory, and
clear_cache removes the entries."""
import os

import numpy as np
import pytest

import avalon
from avalon.runtime import code_cache, native

SOURCE = "def f(x):\n    return x * 2 + 1\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVALON_CACHE_DIR", str(tmp_path))
    code_cache.code_of.cache_clear()
    yield tmp_path / code_cache.SUBDIRECTORY
    code_cache.code_of.cache_clear()


def _run(code):
    env = {}
    exec(code, env)
    return env["f"](20)


def _counting_compile(monkeypatch):
    calls = []

    def counting(source, filename, mode):
        calls.append(filename)
        return compile(source, filename, mode)
    monkeypatch.setattr(code_cache, "compile", counting, raising=False)
    return calls


def test_a_second_process_loads_the_code_without_compiling(cache, monkeypatch):
    calls = _counting_compile(monkeypatch)
    assert _run(code_cache.code_of(SOURCE, "<avalon test>")) == 41
    assert calls == ["<avalon test>"] and len(list(cache.glob("*.code"))) == 1
    code_cache.code_of.cache_clear()          # what a new process starts with
    code = code_cache.code_of(SOURCE, "<avalon test>")
    assert _run(code) == 41 and calls == ["<avalon test>"]
    assert code.co_filename == "<avalon test>"


def test_the_file_name_and_the_source_are_part_of_the_key(cache, monkeypatch):
    calls = _counting_compile(monkeypatch)
    code_cache.code_of(SOURCE, "<avalon a>")
    code_cache.code_of(SOURCE, "<avalon b>")
    code_cache.code_of(SOURCE.replace("2", "3"), "<avalon a>")
    assert len(calls) == 3 and len(list(cache.glob("*.code"))) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_a_damaged_entry_is_compiled_again_and_rewritten(cache, monkeypatch, damage):
    code_cache.code_of(SOURCE, "<avalon test>")
    (entry,) = cache.glob("*.code")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x40
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "empty":
        data = b""
    else:
        data = os.urandom(len(data))
    entry.write_bytes(bytes(data))
    code_cache.code_of.cache_clear()
    calls = _counting_compile(monkeypatch)
    assert _run(code_cache.code_of(SOURCE, "<avalon test>")) == 41
    assert calls == ["<avalon test>"]
    code_cache.code_of.cache_clear()
    assert _run(code_cache.code_of(SOURCE, "<avalon test>")) == 41 and calls == ["<avalon test>"]   # rewritten


def test_an_unwritable_cache_compiles_in_memory(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("AVALON_CACHE_DIR", str(blocked))
    code_cache.code_of.cache_clear()
    try:
        assert _run(code_cache.code_of(SOURCE, "<avalon test>")) == 41
    finally:
        code_cache.code_of.cache_clear()


def test_clear_cache_removes_the_code_objects(cache):
    code_cache.code_of(SOURCE, "<avalon test>")
    assert list(cache.glob("*.code"))
    native.clear_cache()
    assert not list(cache.glob("*"))


def test_a_compiled_step_is_cached_and_loads_in_a_later_compilation(cache, monkeypatch):
    def step(x):
        return avalon.tanh(x) * 2.0 + x.sum(axis=0)
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    first = avalon.jit(step)(x)
    assert list(cache.glob("*.code"))
    code_cache.code_of.cache_clear()
    calls = _counting_compile(monkeypatch)
    again = avalon.jit(step)(x)      # compiled again (a new jit), from the cached code objects
    assert calls == [] and np.array_equal(first, again)
