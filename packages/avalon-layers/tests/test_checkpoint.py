"""avalon.save / avalon.load: round trips, the on-disk format (NumPy-readable
.npz with a JSON manifest), atomic writes, clear errors for damaged files, and
loading the committed file of every past format version."""
import hashlib
import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import avalon
from avalon_layers import checkpoint
from avalon_layers.checkpoint import CheckpointError
from avalon_layers.module import Module

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"


class Tiny(Module):
    """Two parameters, a float buffer and an integer buffer, in a child module."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weight = rng.standard_normal((3, 4)).astype(np.float32)
        self.head = Head(rng)

    def forward(self, x):
        return self.head(x @ self.weight.T)


class Head(Module):
    def __init__(self, rng):
        super().__init__()
        self.bias = rng.standard_normal(3).astype(np.float32)
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
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 1
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
    bad = _rewrite(good, tmp_path / "v2.npz", meta_edit=lambda m: m.update(format_version=2))
    _expect_error(bad, "unknown format version 2: .*newer avalon-layers; upgrade")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="something-else"), "does not describe an 'avalon-checkpoint' file"),
    (lambda m: m.pop("arrays"), "malformed array manifest"),
    (lambda m: m.update(format_version=[1]), r"unknown format version \[1\]: readable versions are \[1\]"),
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
