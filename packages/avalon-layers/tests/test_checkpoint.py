"""avalon.save / avalon.load: round trips, the on-disk format (NumPy-readable
.npz with a JSON manifest), atomic writes and the removal of temporary files a
killed save left, clear errors for damaged files (every single-bit flip and
every truncation), optimizer states, and loading the committed file of every
past format version."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import avalon
from avalon_layers import checkpoint
from avalon_layers.checkpoint import CheckpointError
from avalon_layers.module import Module, Parameter

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"


class Tiny(Module):
    """Two parameters, a float buffer and an integer buffer, in a child module."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weight = Parameter(rng.standard_normal((3, 4)).astype(np.float32))
        self.head = Head(rng)

    def forward(self, x):
        return self.head(x @ self.weight.T)


class Head(Module):
    def __init__(self, rng):
        super().__init__()
        self.bias = Parameter(rng.standard_normal(3).astype(np.float32))
        self.register_buffer("running_mean", rng.standard_normal(3).astype(np.float32))
        self.register_buffer("num_batches_tracked", np.array(int(rng.integers(100)), np.int64))

    def forward(self, x):
        return x + self.bias


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert type(b[k]) is np.ndarray
        assert np.asarray(a[k]).dtype == b[k].dtype and np.shape(a[k]) == b[k].shape, k
        np.testing.assert_array_equal(np.asarray(a[k]), b[k])


def _metadata(path):
    with np.load(path, allow_pickle=False) as z:  # NumPy alone reads the whole file
        return json.loads(z["__avalon__.json"].decode("utf-8"))


# -- round trips ----------------------------------------------------------------

def test_state_dict_round_trip_keeps_order_dtypes_shapes_and_values(tmp_path):
    rng = np.random.default_rng(1)
    state = OrderedDict([
        ("z.last_first", rng.standard_normal((2, 3)).astype(np.float32)),
        ("a.float64", rng.standard_normal(5)),
        ("a.float16", rng.standard_normal(4).astype(np.float16)),
        ("ints", np.arange(6, dtype=np.int64).reshape(3, 2)),
        ("int32", np.array([-1, 2], np.int32)),
        ("mask", np.array([True, False, True])),
        ("scalar", np.array(3.5, np.float32)),
        ("empty", np.zeros((0, 3), np.float32)),
        ("transposed", rng.standard_normal((3, 4)).astype(np.float32).T),   # not C-contiguous
        ("fortran", np.asfortranarray(rng.standard_normal((2, 5)).astype(np.float32))),
    ])
    path = tmp_path / "state.npz"
    assert avalon.save(state, path) is None
    loaded = avalon.load(path)
    assert type(loaded) is OrderedDict
    _assert_same_state(state, loaded)
    assert avalon.load(str(path)).keys() == loaded.keys()  # str and PathLike paths


def test_a_model_saves_its_state_dict_and_class_and_loads_into_another(tmp_path):
    model, other = Tiny(seed=0), Tiny(seed=1)
    path = tmp_path / "model.npz"
    avalon.save(model, path)
    meta = _metadata(path)
    assert meta["kind"] == "model"
    assert meta["class"] == f"{Tiny.__module__}.Tiny"
    _assert_same_state(model.state_dict(), avalon.load(path))

    assert not np.array_equal(other.weight, model.weight)
    assert avalon.load(path, model=other) is other
    _assert_same_state(model.state_dict(), other.state_dict())
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(other(x), model(x))


def test_loading_into_a_model_with_other_keys_is_an_error_unless_not_strict(tmp_path):
    path = tmp_path / "partial.npz"
    state = Tiny().state_dict()
    del state["head.bias"]
    avalon.save(state, path)
    with pytest.raises(avalon.ShapeError, match="missing keys: head.bias"):
        avalon.load(path, model=Tiny())
    m = Tiny(seed=5)
    bias = m.head.bias.copy()
    avalon.load(path, model=m, strict=False)
    np.testing.assert_array_equal(m.head.bias, bias)
    np.testing.assert_array_equal(m.weight, state["weight"])


def test_saving_overwrites_an_existing_checkpoint(tmp_path):
    path = tmp_path / "ck.npz"
    avalon.save({"w": np.zeros(2, np.float32)}, path)
    avalon.save({"w": np.ones(3, np.float32)}, path)
    np.testing.assert_array_equal(avalon.load(path)["w"], np.ones(3, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]


def test_pytorch_state_dicts_save_as_numpy_or_as_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net(torch.randn(4, 3))  # updates running stats and num_batches_tracked
    converted = {k: v.numpy() for k, v in net.state_dict().items()}
    avalon.save(converted, tmp_path / "np.npz")
    avalon.save(net.state_dict(), tmp_path / "tensors.npz")
    for name in ("np.npz", "tensors.npz"):
        loaded = avalon.load(tmp_path / name)
        _assert_same_state(converted, loaded)
    assert loaded["1.num_batches_tracked"].dtype == np.int64 and loaded["1.num_batches_tracked"] == 1


def test_a_pytorch_linear_loads_into_avalon_nn_linear(tmp_path):
    torch = pytest.importorskip("torch")
    import avalon.nn as nn
    torch.manual_seed(1)
    ref = torch.nn.Linear(5, 3)
    avalon.save({k: v.detach().numpy() for k, v in ref.state_dict().items()}, tmp_path / "lin.npz")
    layer = avalon.load(tmp_path / "lin.npz", model=nn.Linear(5, 3))
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(x), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_bad_things_to_save_are_refused():
    with pytest.raises(TypeError, match="model .* or a state dict"):
        avalon.save([np.zeros(2)], "never-written.npz")
    with pytest.raises(TypeError, match="keys must be non-empty strings"):
        avalon.save({1: np.zeros(2)}, "never-written.npz")
    with pytest.raises(TypeError, match="holds Python objects"):
        avalon.save({"o": np.array([object()])}, "never-written.npz")
    assert not os.path.exists("never-written.npz")


# -- the format ------------------------------------------------------------------

def test_the_file_is_an_uncompressed_npz_with_a_manifest(tmp_path):
    model = Tiny()
    path = tmp_path / "m.npz"
    avalon.save(model, path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert [i.filename for i in infos] == ["__avalon__.json"] + [k + ".npy" for k in model.state_dict()]

    meta = _metadata(path)
    import avalon_layers
    assert meta["format"] == "avalon-checkpoint"
    # a flat state dict is still written as version 1, which every release reads
    assert meta["format_version"] == 1 and checkpoint.FORMAT_VERSION == 2
    assert meta["avalon_version"] == avalon.__version__
    assert meta["avalon_layers_version"] == avalon_layers.__version__
    state = model.state_dict()
    assert [e["key"] for e in meta["arrays"]] == list(state)
    with np.load(path, allow_pickle=False) as z:
        for entry in meta["arrays"]:
            arr = z[entry["key"]]
            np.testing.assert_array_equal(arr, state[entry["key"]])
            assert entry["dtype"] == arr.dtype.str and entry["shape"] == list(arr.shape)
            assert entry["sha256"] == hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_committed_v1_file_loads_with_its_known_values():
    path = FIXTURES / "v1.npz"
    assert _metadata(path)["format_version"] == 1
    state = avalon.load(path)
    assert list(state) == ["fc.weight", "fc.bias", "bn.running_mean", "bn.running_var",
                           "bn.num_batches_tracked", "scale"]
    np.testing.assert_array_equal(state["fc.weight"], np.array([[-1.0, -0.5, 0.0], [0.5, 1.0, 1.5]], np.float32))
    np.testing.assert_array_equal(state["fc.bias"], np.array([0.25, -0.5], np.float32))
    np.testing.assert_array_equal(state["bn.running_mean"], np.array([0.1, 0.2], np.float32))
    np.testing.assert_array_equal(state["bn.running_var"], np.array([1.5, 2.5], np.float32))
    assert state["bn.num_batches_tracked"].dtype == np.int64 and state["bn.num_batches_tracked"] == 7
    assert state["scale"].dtype == np.float64 and state["scale"] == np.pi
    assert all(state[k].dtype == np.float32 for k in ("fc.weight", "fc.bias", "bn.running_mean"))


def test_every_format_version_has_a_loader_and_a_committed_fixture():
    assert sorted(checkpoint._LOADERS) == list(range(1, checkpoint.FORMAT_VERSION + 1))
    for version in checkpoint._LOADERS:
        assert (FIXTURES / f"v{version}.npz").is_file(), f"commit a fixture written by format version {version}"


# -- atomic writes ------------------------------------------------------------------

def _crash_on_second_array(monkeypatch):
    real = np.lib.format.write_array
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)
    monkeypatch.setattr(np.lib.format, "write_array", flaky)


def test_a_crash_mid_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    old = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}
    avalon.save(old, path)
    before = path.read_bytes()
    _crash_on_second_array(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        avalon.save({"a": np.full(3, 7, np.float32), "b": np.full(2, 8, np.float32), "c": np.zeros(1)}, path)
    assert path.read_bytes() == before
    _assert_same_state(old, avalon.load(path))
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]


def test_a_crash_writing_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    _crash_on_second_array(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        avalon.save({"a": np.zeros(3), "b": np.zeros(3)}, tmp_path / "new.npz")
    assert os.listdir(tmp_path) == []


def test_the_data_is_fsynced_before_it_replaces_the_target(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(a).parent, Path(b).name)),
                                                     real_replace(a, b))[1])
    avalon.save({"w": np.zeros(2)}, tmp_path / "ck.npz")
    replaces = [e for e in events if e != "fsync"]
    assert replaces == [("replace", tmp_path, "ck.npz")]  # the temp file sat beside the target
    assert events.index("fsync") < events.index(replaces[0])


# -- damaged files -------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.npz"
    avalon.save(OrderedDict([("w", np.arange(64, dtype=np.float32)), ("b", np.ones(3, np.float32))]), path)
    return path


def _expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        avalon.load(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, avalon.AvalonError)
    return str(info.value)


@pytest.mark.parametrize("keep", [0, 3, 10, 0.5, -1])
def test_a_truncated_file_is_a_clear_error(good, keep):
    blob = good.read_bytes()
    n = int(len(blob) * keep) if isinstance(keep, float) else (len(blob) - 1 if keep == -1 else keep)
    good.write_bytes(blob[:n])
    match = {0: "the file is empty", 3: "zip/npz signature"}.get(n, "truncated or corrupt archive")
    _expect_error(good, match)


def test_flipped_bytes_in_an_array_are_a_clear_error(good):
    blob = bytearray(good.read_bytes())
    at = bytes(blob).find(np.arange(64, dtype=np.float32).tobytes())
    assert at > 0
    blob[at + 17] ^= 0xFF
    good.write_bytes(bytes(blob))
    _expect_error(good, "array 'w' is corrupt")


def test_a_file_that_is_not_a_zip_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"\x80\x04\x95 not a zip archive at all")
    _expect_error(path, "not an Avalon checkpoint.*zip/npz signature")


def test_a_plain_npz_or_a_pytorch_file_lacks_the_metadata(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.zeros(2))
    msg = _expect_error(tmp_path / "plain.npz", "no __avalon__.json entry")
    assert "numpy.load" in msg
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    _expect_error(tmp_path / "model.pt", "no __avalon__.json entry.*torch.load")


def _rewrite(src, dst, meta_edit=None, arrays_edit=None):
    """Copy a checkpoint, editing its metadata and arrays, with valid zip CRCs."""
    with zipfile.ZipFile(src) as zf:
        meta = json.loads(zf.read("__avalon__.json"))
        entries = {n: zf.read(n) for n in zf.namelist() if n != "__avalon__.json"}
    if meta_edit:
        meta_edit(meta)
    if arrays_edit:
        arrays_edit(entries)
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("__avalon__.json", json.dumps(meta))
        for n, data in entries.items():
            zf.writestr(n, data)
    return dst


def _npy(arr):
    import io
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_altered_array_bytes_fail_the_checksum(good, tmp_path):
    def alter(entries):
        entries["w.npy"] = _npy(np.arange(64, dtype=np.float32)[::-1].copy())
    bad = _rewrite(good, tmp_path / "bad.npz", arrays_edit=alter)
    _expect_error(bad, "checksum mismatch for array 'w'")


def test_a_newer_format_version_asks_for_an_upgrade(good, tmp_path):
    newer = checkpoint.FORMAT_VERSION + 1
    bad = _rewrite(good, tmp_path / "newer.npz", meta_edit=lambda m: m.update(format_version=newer))
    _expect_error(bad, f"unknown format version {newer}: .*newer avalon-layers; upgrade")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="something-else"), "does not describe an 'avalon-checkpoint' file"),
    (lambda m: m.pop("arrays"), "malformed array manifest"),
    (lambda m: m.update(format_version=[1]), r"unknown format version \[1\]: readable versions are \[1, 2\]"),
    (lambda m: m["arrays"][0].update(shape=[8, 8]), r"array 'w' is <f4 \(64,\), but the manifest says <f4 \(8, 8\)"),
    (lambda m: m["arrays"].append({"key": "gone", "dtype": "<f4", "shape": [1], "sha256": ""}),
     "array 'gone' is listed in the manifest but missing"),
    (lambda m: m["arrays"].pop(), "entries not in the manifest: b.npy"),
])
def test_metadata_that_does_not_match_the_arrays_is_a_clear_error(good, tmp_path, edit, match):
    _expect_error(_rewrite(good, tmp_path / "bad.npz", meta_edit=edit), match)


def test_unreadable_metadata_is_a_clear_error(good, tmp_path):
    with zipfile.ZipFile(good) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    entries["__avalon__.json"] = b"{not json"
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as zf:
        for n, data in entries.items():
            zf.writestr(n, data)
    _expect_error(tmp_path / "bad.npz", "unreadable __avalon__.json")


# -- every kind of damage is a CheckpointError -----------------------------------------

def _same(a, b):
    """Equal structure, types, dtypes, shapes and bytes."""
    if isinstance(a, np.ndarray):
        return (type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
                and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())
    if isinstance(a, dict):
        return (type(a) is type(b) and list(a) == list(b)) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or a != a and b != b)


def _small_checkpoints(tmp_path):
    flat = tmp_path / "flat.npz"
    avalon.save(OrderedDict([("w", np.arange(4, dtype=np.float32)), ("n", np.array(3, np.int64))]), flat)
    nested = tmp_path / "nested.npz"
    avalon.save({"state": {"w": {"step": 2, "m": np.ones(2, np.float32)}}, "betas": (0.9, 0.999)}, nested)
    return flat, nested


def test_every_single_bit_flip_loads_unchanged_or_raises_checkpoint_error(tmp_path):
    for path in _small_checkpoints(tmp_path):
        blob = path.read_bytes()
        reference = avalon.load(path)
        outcomes = {"same": 0, "error": 0}
        with open(path, "r+b", buffering=0) as f:  # one byte rewritten in place per flip: fast
            for bit in range(len(blob) * 8):
                at = bit // 8
                f.seek(at)
                f.write(bytes([blob[at] ^ (1 << (bit % 8))]))
                try:
                    loaded = avalon.load(path)
                except CheckpointError:
                    outcomes["error"] += 1
                else:
                    assert _same(reference, loaded), f"{path.name}: flipping bit {bit} changed the contents"
                    outcomes["same"] += 1
                f.seek(at)
                f.write(blob[at:at + 1])
        assert outcomes["error"] > len(blob) * 4, outcomes  # most bits matter


def test_every_truncation_raises_checkpoint_error(tmp_path):
    for path in _small_checkpoints(tmp_path):
        blob = path.read_bytes()
        for n in range(len(blob)):
            path.write_bytes(blob[:n])
            with pytest.raises(CheckpointError, match=re.escape(str(path))):
                avalon.load(path)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["arrays"][0].update(key=5), r"entry 0: key 5 is not a non-empty string"),
    (lambda m: m["arrays"][0].update(key=""), r"entry 0: key '' is not a non-empty string"),
    (lambda m: m["arrays"][1].update(key="w"), r"array 'w' is listed twice"),
    (lambda m: m["arrays"][0].update(dtype=4), r"entry 0: dtype 4 is not a string"),
    (lambda m: m["arrays"][0].update(dtype="<f5"), r"entry 0: .*<f5"),
    (lambda m: m["arrays"][0].update(dtype="|O"), r"entry 0: dtype '\|O' holds Python objects"),
    (lambda m: m["arrays"][0].update(shape=[-64]), r"entry 0: shape \[-64\] is not a list of sizes"),
    (lambda m: m["arrays"][0].update(shape="64"), r"entry 0: shape '64' is not a list of sizes"),
    (lambda m: m["arrays"][0].update(shape=[True]), r"entry 0: shape \[True\] is not a list of sizes"),
    (lambda m: m["arrays"][0].update(sha256=None), r"entry 0: sha256 None is not a string"),
    (lambda m: m.update(arrays={"w": 1}), r"'arrays' is not a list"),
    (lambda m: m["arrays"].__setitem__(0, "w"), r"entry 0: 'w' is not an object"),
    (lambda m: m["arrays"][0].update(shape=[10 ** 30]), r"array 'w' is <f4 \(64,\), but the manifest says"),
])
def test_a_malformed_manifest_is_a_checkpoint_error(good, tmp_path, edit, match):
    msg = _expect_error(_rewrite(good, tmp_path / "bad.npz", meta_edit=edit), match)
    assert "malformed array manifest" in msg or "manifest says" in msg or "listed twice" in msg


def test_an_npy_header_that_disagrees_with_the_manifest_is_caught_before_reading(good, tmp_path):
    def huge(entries):  # a header claiming 10**12 floats: refused without allocating them
        header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
        header["shape"] = (10 ** 12,)
        import io
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        entries["w.npy"] = buf.getvalue() + entries["w.npy"][-256:]
    _expect_error(_rewrite(good, tmp_path / "bad.npz", arrays_edit=huge),
                  r"array 'w' is <f4 \(1000000000000,\), but the manifest says <f4 \(64,\)")


# -- temporary files of a killed save ------------------------------------------------------

def _temp_files(directory, name="ck.npz"):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(f".{name}.") and
                  p.name.endswith(".tmp"))


def test_the_next_save_removes_temp_files_that_a_dead_save_left(tmp_path):
    orphans = [".ck.npz.0123456789ab.tmp", ".ck.npz.deadbeef0000.tmp"]
    others = [".ck.npz.0123456789ab.tmp.keep", ".other.npz.0123456789ab.tmp", "ck.npz.0123456789ab.tmp",
              ".ck.npz.0123456789AB.tmp", ".ck.npz.0123.tmp", ".ck.npzz.0123456789ab.tmp", "notes.txt"]
    for name in orphans + others:
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a checkpoint")
    (tmp_path / ".ck.npz.fedcba987654.tmp").mkdir()  # named like one, but not a file: not ours
    avalon.save({"w": np.zeros(2)}, tmp_path / "ck.npz")
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["ck.npz", ".ck.npz.fedcba987654.tmp"])
    np.testing.assert_array_equal(avalon.load(tmp_path / "ck.npz")["w"], np.zeros(2))


_STALLED_SAVE = textwrap.dedent("""
    import sys, time
    import numpy as np
    import avalon
    real = np.lib.format.write_array
    def stall(*args, **kwargs):
        real(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(120)
    np.lib.format.write_array = stall
    avalon.save({"w": np.ones(3)}, sys.argv[1])
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_midway_leaves_a_temp_file_that_the_next_save_removes_but_not_a_live_one(tmp_path):
    path = tmp_path / "ck.npz"
    avalon.save({"w": np.zeros(2)}, path)
    child = subprocess.Popen([sys.executable, "-c", _STALLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        (live,) = _temp_files(tmp_path)
        avalon.save({"w": np.full(2, 5.0)}, path)  # the child is still writing: its file stays
        assert _temp_files(tmp_path) == [live]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert _temp_files(tmp_path) == [live]  # a killed save cannot clean up after itself
    np.testing.assert_array_equal(avalon.load(path)["w"], np.full(2, 5.0))  # the target is intact
    avalon.save({"w": np.full(2, 6.0)}, path)
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]
    np.testing.assert_array_equal(avalon.load(path)["w"], np.full(2, 6.0))


# -- nested states: optimizers, schedulers, training checkpoints ------------------------------------

def _adam_run(steps, save_at=None, tmp_path=None, through_object=False):
    """Parameters after `steps` Adam steps on a fixed problem; with save_at, the
    model and the optimizer go through avalon.save / avalon.load at that step
    (into a fresh model and optimizer)."""
    model = Tiny(seed=0)
    opt = avalon.optim.Adam(lr=0.05, betas=(0.8, 0.99), amsgrad=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)

    def loss_fn(m):
        return avalon.mean(m(x) ** 2)
    for step in range(steps):
        if step == save_at:
            avalon.save(model, tmp_path / "model.npz")
            avalon.save(opt if through_object else opt.state_dict(), tmp_path / "opt.npz")
            model = avalon.load(tmp_path / "model.npz", model=Tiny(seed=1))
            opt = avalon.optim.Adam()
            if through_object:
                avalon.load(tmp_path / "opt.npz", model=opt)
            else:
                opt.load_state_dict(avalon.load(tmp_path / "opt.npz"))
        _, (grads,) = avalon.grad(loss_fn, model)
        opt.step(model, grads)
    return model.state_dict(), opt.state_dict()


@pytest.mark.parametrize("through_object", [False, True], ids=["state_dict", "optimizer"])
def test_adam_resumed_from_a_checkpoint_continues_bit_identically(tmp_path, through_object):
    expected_params, expected_opt = _adam_run(6)
    params, opt_state = _adam_run(6, save_at=3, tmp_path=tmp_path, through_object=through_object)
    assert _same(dict(expected_params), dict(params))
    assert _same(expected_opt, opt_state)
    meta = _metadata(tmp_path / "opt.npz")
    assert meta["format_version"] == 2 and meta["kind"] == ("model" if through_object else "state_dict")


def test_nested_values_load_back_as_they_were_saved(tmp_path):
    opt = avalon.optim.SGD(lr=0.1)
    sched = avalon.optim.StepLR(opt, step_size=2, gamma=0.5)
    state = {
        "model": {"w": np.arange(3, dtype=np.float32)},
        "epoch": 3, "best": 0.25, "worst": float("inf"), "nan": float("nan"), "name": "run-1", "note": None,
        "flags": [True, False], "pair": (1, (2.5, "x")), "scalar": np.float32(1.5), "empty": {}, 7: "int key",
        "scheduler": sched.state_dict(),
    }
    path = tmp_path / "train.npz"
    avalon.save(state, path)
    loaded = avalon.load(path)
    assert _same(state, loaded)
    assert type(loaded["scalar"]) is np.float32 and type(loaded["pair"][1]) is tuple
    sched2 = avalon.optim.StepLR(avalon.optim.SGD(lr=0.1), step_size=2, gamma=0.5)
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.state_dict() == sched.state_dict()
    with np.load(path, allow_pickle=False) as z:  # NumPy alone still reads every array
        np.testing.assert_array_equal(z["model/w"], state["model"]["w"])


def test_what_a_checkpoint_cannot_hold_is_refused_before_writing(tmp_path):
    path = tmp_path / "never.npz"
    with pytest.raises(TypeError, match=r"cannot store a set at \['a'\]\['b'\]"):
        avalon.save({"a": {"b": {1, 2}}, "w": np.zeros(1)}, path)
    with pytest.raises(TypeError, match="keys must be strings or integers"):
        avalon.save({"a": {(1, 2): 3}}, path)
    with pytest.raises(TypeError, match="the object first"):
        avalon.save(path, {"w": np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_a_reader_of_version_1_only_asks_for_an_upgrade_for_nested_states(tmp_path, monkeypatch):
    avalon.save({"opt": {"step": 1}}, tmp_path / "nested.npz")
    monkeypatch.setattr(checkpoint, "_LOADERS", {1: checkpoint._LOADERS[1]})
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    _expect_error(tmp_path / "nested.npz", "unknown format version 2: .*upgrade")


@pytest.mark.parametrize("tree, match", [
    ({"dict": [["a"]]}, "malformed tree"),
    ({"array": "nowhere"}, "malformed tree"),
    ({"set": [1]}, "malformed tree"),
    ({"float": "1.5"}, "malformed tree"),
    ([1, 2], "malformed tree"),
])
def test_a_malformed_tree_is_a_checkpoint_error(tmp_path, tree, match):
    path = tmp_path / "nested.npz"
    avalon.save({"a": {"w": np.zeros(2)}}, path)
    _expect_error(_rewrite(path, tmp_path / "bad.npz", meta_edit=lambda m: m.update(tree=tree)), match)


def test_committed_v2_file_loads_with_its_known_values():
    path = FIXTURES / "v2.npz"
    assert _metadata(path)["format_version"] == 2
    state = avalon.load(path)
    assert state["optimizer"] == "Adam" and state["hyperparameters"]["betas"] == (0.9, 0.999)
    assert state["hyperparameters"]["amsgrad"] is False
    assert list(state["state"]) == ["fc.weight", "fc.bias"]
    assert state["state"]["fc.weight"]["step"] == 3
    np.testing.assert_array_equal(state["state"]["fc.weight"]["exp_avg"],
                                  np.array([[0.5, -0.25, 1.0], [2.0, 0.0, -1.5]], np.float32))
    np.testing.assert_array_equal(state["state"]["fc.bias"]["exp_avg_sq"], np.array([0.125, 4.0], np.float32))
    assert state["epoch"] == 7 and state["scale"] == np.float64(np.pi) and type(state["scale"]) is np.float64
