"""avalon.runtime.kernel_cache: the cache directory's size limit, least recently used
files removed first, and the command line that shows, prunes and clears it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from avalon.runtime import kernel_cache, native
from avalon.runtime.disk_memo import DiskMemo

FLAGS = ("-O1", "-fPIC", "-shared")
needs_cc = pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc", "clang"))), reason="no C compiler")
KEY = "ab" * 32


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "kernels"
    monkeypatch.setenv("AVALON_CACHE_DIR", str(directory))
    monkeypatch.delenv("AVALON_CACHE_SIZE", raising=False)
    native._reset_for_tests()
    yield directory
    native._reset_for_tests()


def put_file(path, size: int, used_ago: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - used_ago
    os.utime(path, (when, when))
    return path


def entry(directory, n: int):
    return directory / f"{n:064x}.so"


def disk(path) -> int:
    """The disk space a file takes, as the limit counts it."""
    return kernel_cache._disk_bytes(os.stat(path))


@pytest.fixture
def unit(tmp_path) -> int:
    """The disk space of a 4096-byte file here (4096 where blocks are 4 KiB)."""
    return disk(put_file(tmp_path / "probe", 4096, 0))


def test_prune_removes_the_least_recently_used_down_to_the_low_water_mark(cache, unit):
    # ten files, the oldest first; limit six files: down to four (LOW_WATER 0.8)
    files = [put_file(entry(cache, i) if i % 2 else cache / "lowered" / f"{i}.kernel", 4096, 1000 - i)
             for i in range(10)]
    pruned = kernel_cache.prune(6 * unit)
    assert (pruned.removed, pruned.freed) == (6, 6 * unit)
    assert [f.exists() for f in files] == [False] * 6 + [True] * 4
    assert pruned.left == kernel_cache.usage() == kernel_cache.Usage(4, 4 * unit)
    assert (cache / kernel_cache.STAMP).is_file()


def test_sizes_are_the_disk_space_files_take(cache, unit):
    small = put_file(cache / "tuning" / "k.json", 300, 0)
    assert kernel_cache.usage().bytes == disk(small) >= 300
    assert os.stat(small).st_blocks * 512 == disk(small)


def test_prune_under_the_limit_or_without_one_removes_nothing(cache, unit):
    files = [put_file(entry(cache, i), 4096, 100) for i in range(3)]
    assert kernel_cache.prune(3 * unit).removed == 0
    assert kernel_cache.prune(None).removed == 0
    assert all(f.exists() for f in files)


def test_a_recent_access_counts_as_use(cache, unit):
    old, read = put_file(entry(cache, 1), 4096, 5000), put_file(entry(cache, 2), 4096, 4000)
    write_time = time.time() - 9000
    os.utime(read, (time.time(), write_time))     # read a moment ago, written long ago
    kernel_cache.prune(int(1.5 * unit))
    assert read.exists() and not old.exists()


def test_writes_running_now_are_neither_counted_nor_removed_and_orphans_are(cache, unit):
    running = [put_file(cache / "tmp-0123-77-abc.c", 4096, 5),
               put_file(cache / "lowered" / f".{KEY}-77-abc.tmp", 4096, 5)]
    orphan = put_file(cache / "tmp-0456-78-def.so", 4096, 3600)
    foreign = put_file(cache / "README", 4096, 3600)
    assert kernel_cache.usage() == kernel_cache.Usage(1, unit)
    assert kernel_cache.prune(100).removed == 1
    assert all(f.exists() for f in running) and foreign.exists() and not orphan.exists()


@pytest.mark.parametrize("text, size", [("123", 123), ("500M", 500 << 20), ("2G", 2 << 30), ("1.5k", 1536),
                                        ("3 GiB", 3 << 30), (" 7mb ", 7 << 20), ("0", None), ("none", None)])
def test_avalon_cache_size_reads_bytes_and_units(monkeypatch, text, size):
    monkeypatch.setenv("AVALON_CACHE_SIZE", text)
    assert kernel_cache.size_limit() == size


def test_the_default_limit_applies_without_the_variable(monkeypatch):
    monkeypatch.delenv("AVALON_CACHE_SIZE", raising=False)
    assert kernel_cache.size_limit() == kernel_cache.DEFAULT_LIMIT


@pytest.mark.parametrize("text", ["12X", "-5G", "G", "1e9"])
def test_a_size_that_is_not_one_is_refused_with_the_forms_that_are(monkeypatch, text):
    monkeypatch.setenv("AVALON_CACHE_SIZE", text)
    with pytest.raises(kernel_cache.CacheSizeError, match=r"AVALON_CACHE_SIZE=.* is not a size.*\"2G\".*0 for no"):
        kernel_cache.size_limit()


def _memo_writes(count: int, size: int):
    memo = DiskMemo("lowered", ".kernel", bytes, bytes)
    for i in range(count):
        memo.put(f"{i:064x}", b"y" * size)
        time.sleep(0.002)   # distinct times: the order of use is the order of writing


def test_writes_past_a_quarter_of_the_limit_prune_in_the_background(cache, monkeypatch):
    monkeypatch.setenv("AVALON_CACHE_SIZE", "64K")
    cache.mkdir()
    kernel_cache._stamp(cache)                       # measured just now by some process
    _memo_writes(40, 1000)                           # 40 files of a block each: 160 KiB
    kernel_cache.wait_for_prune(10)
    lowered = cache / "lowered"
    assert not (lowered / f"{0:064x}.kernel").exists() and (lowered / f"{39:064x}.kernel").exists()
    assert kernel_cache.usage().files < 40


def test_a_fresh_stamp_spares_small_writes_the_scan_and_a_stale_one_does_not(cache, monkeypatch, unit):
    monkeypatch.setenv("AVALON_CACHE_SIZE", str(10 * unit))
    old = [put_file(cache / "python" / f"{i}.code", 4096, 9000 - i) for i in range(12)]
    kernel_cache._stamp(cache)
    _memo_writes(1, 100)
    kernel_cache.wait_for_prune(10)
    assert all(f.exists() for f in old)              # measured today: not due
    kernel_cache._reset_for_tests()
    day_ago = time.time() - kernel_cache.PRUNE_INTERVAL_S - 60
    os.utime(cache / kernel_cache.STAMP, (day_ago, day_ago))
    _memo_writes(1, 100)
    kernel_cache.wait_for_prune(10)
    assert kernel_cache.usage().bytes <= 8 * unit and not old[0].exists() and old[-1].exists()


@needs_cc
def test_a_loaded_shared_object_counts_as_used_and_survives_a_prune(cache):
    used, unused = "int used(void) { return 1; }\n", "int unused(void) { return 2; }\n"
    native.build(used, flags=FLAGS)
    native.build(unused, flags=FLAGS)
    sizes = {}
    for path in cache.glob("*.so"):
        sizes[path] = disk(path)
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    native._reset_for_tests()
    runs = native.compiler_runs()
    native.build(used, flags=FLAGS)                   # from the disk
    assert native.compiler_runs() == runs
    # marked used by the loader itself (its modification time), not only by an access
    # time that a noatime filesystem would not keep
    assert sorted(time.time() - p.stat().st_mtime < 600 for p in sizes) == [False, True]
    others = kernel_cache.usage().bytes - sum(sizes.values())     # the compiler-version memo
    assert kernel_cache.prune(int((max(sizes.values()) + others + 100) / kernel_cache.LOW_WATER)).removed == 1
    native._reset_for_tests()
    native.build(used, flags=FLAGS)
    assert native.compiler_runs() == runs            # kept
    native.build(unused, flags=FLAGS)
    assert native.compiler_runs() == runs + 1        # removed, compiled again


def test_clear_cache_removes_memo_files_too(cache):
    put_file(entry(cache, 1), 10, 0)
    put_file(cache / "tuning" / "k.json", 10, 0)
    assert kernel_cache.clear_cache() == 1
    assert kernel_cache.usage() == kernel_cache.Usage(0, 0)


def test_the_command_line_shows_prunes_and_clears(cache, capsys, monkeypatch, unit):
    for i in range(4):
        put_file(entry(cache, i), 4096, 100 - i)
    human = kernel_cache._human
    assert kernel_cache.main([]) == 0
    assert f"{cache}: 4 files, {human(4 * unit)} (limit: 2.0 GiB)" in capsys.readouterr().out
    assert kernel_cache.main(["--prune", str(3 * unit)]) == 0
    out = capsys.readouterr().out
    assert f"removed 2 files, {human(2 * unit)}" in out and f": 2 files, {human(2 * unit)}" in out
    assert kernel_cache.main(["--clear"]) == 0
    assert ": 0 files, 0 B" in capsys.readouterr().out
    monkeypatch.setenv("AVALON_CACHE_SIZE", "lots")
    assert kernel_cache.main([]) == 2
    assert "AVALON_CACHE_SIZE='lots' is not a size" in capsys.readouterr().err


def test_python_m_avalon_cache_runs_the_command_line(cache):
    put_file(entry(cache, 1), 4096, 0)
    env = {**os.environ, "AVALON_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "avalon.cache"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"{cache}: 1 files" in done.stdout
