"""Fashion-MNIST and MNIST loaders on small fake IDX directories, the MNIST download path
(with urlopen replaced), the real Debian Fashion-MNIST when installed, and the install script."""
import hashlib
import importlib
import io
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import avalon
from avalon_zoo.datasets import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MD5,
                                 MNIST_MIRRORS, DatasetError, DatasetNotFoundError, fashion_mnist,
                                 fashion_mnist_available, mnist, write_idx)
# The package's `fashion_mnist` and `mnist` attributes are the functions; these are their modules.
fashion_module = importlib.import_module("avalon_zoo.datasets.fashion_mnist")
mnist_module = importlib.import_module("avalon_zoo.datasets.mnist")

NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
ALL_NAMES = NAMES["train"] + NAMES["test"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_fashion_mnist.sh"


def fake_split(seed, count):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)


def write_fake_dataset(directory, counts=(12, 5), compress=True, names=ALL_NAMES, seed=0):
    """Writes the IDX files `names` of a fake MNIST-layout dataset; returns {split: (images, labels)}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"train": fake_split(seed, counts[0]), "test": fake_split(seed + 1, counts[1])}
    for split, (images_name, labels_name) in NAMES.items():
        for name, array in zip((images_name, labels_name), data[split]):
            if name in names:
                write_idx(directory / (f"{name}.gz" if compress else name), array, gzip=compress)
    return data


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """No AVALON_DATA and no Debian directory: only what a test sets up is found."""
    monkeypatch.delenv("AVALON_DATA", raising=False)
    monkeypatch.setattr(fashion_module, "SYSTEM_DIRS", (str(tmp_path / "no-system-dir"),))


# ---------------------------------------------------------------- Fashion-MNIST on fake directories

def test_root_argument(tmp_path, no_system_data):
    data = write_fake_dataset(tmp_path / "fm")
    for split, count in (("train", 12), ("test", 5)):
        images, labels = fashion_mnist(split, root=tmp_path / "fm", _expected_count=None)
        assert images.shape == (count, 1, 28, 28) and images.dtype == np.float32
        assert labels.shape == (count,) and labels.dtype == np.int64
        np.testing.assert_array_equal(images[:, 0], data[split][0].astype(np.float32) / 255)
        np.testing.assert_array_equal(labels, data[split][1])
        assert 0.0 <= images.min() and images.max() <= 1.0


def test_avalon_data_names_the_directory_or_its_parent(tmp_path, monkeypatch, no_system_data):
    data = write_fake_dataset(tmp_path / "parent" / "fashion-mnist")
    for value in (tmp_path / "parent", tmp_path / "parent" / "fashion-mnist"):
        monkeypatch.setenv("AVALON_DATA", str(value))
        _, labels = fashion_mnist("test", _expected_count=None)
        np.testing.assert_array_equal(labels, data["test"][1])
        assert fashion_mnist_available()


def test_root_argument_comes_before_avalon_data(tmp_path, monkeypatch, no_system_data):
    from_root = write_fake_dataset(tmp_path / "a", seed=10)
    write_fake_dataset(tmp_path / "b", seed=20)
    monkeypatch.setenv("AVALON_DATA", str(tmp_path / "b"))
    _, labels = fashion_mnist("train", root=tmp_path / "a", _expected_count=None)
    np.testing.assert_array_equal(labels, from_root["train"][1])


def test_system_directory_is_the_last_resort(tmp_path, monkeypatch):
    monkeypatch.delenv("AVALON_DATA", raising=False)
    data = write_fake_dataset(tmp_path / "system")
    monkeypatch.setattr(fashion_module, "SYSTEM_DIRS", (str(tmp_path / "system"),))
    _, labels = fashion_mnist("test", root=tmp_path / "empty", _expected_count=None)
    np.testing.assert_array_equal(labels, data["test"][1])


def test_uncompressed_files(tmp_path, no_system_data):
    data = write_fake_dataset(tmp_path, compress=False)
    assert not list(tmp_path.glob("*.gz"))
    images, _ = fashion_mnist("train", root=tmp_path, _expected_count=None)
    np.testing.assert_array_equal(images[:, 0], data["train"][0] / np.float32(255))


def test_layout_and_dtype_options(tmp_path, no_system_data):
    raw = write_fake_dataset(tmp_path)["train"][0]
    flat, _ = fashion_mnist(root=tmp_path, flatten=True, _expected_count=None)
    assert flat.shape == (12, 784)
    np.testing.assert_array_equal(flat, raw.reshape(12, 784) / np.float32(255))
    pixels, _ = fashion_mnist(root=tmp_path, normalize=False, _expected_count=None)
    assert pixels.dtype == np.float32 and pixels.max() == raw.max() > 1
    exact, _ = fashion_mnist(root=tmp_path, dtype=np.float64, _expected_count=None)
    assert exact.dtype == np.float64
    np.testing.assert_array_equal(exact[:, 0], raw / 255.0)
    as_bytes, _ = fashion_mnist(root=tmp_path, normalize=False, dtype=np.uint8, _expected_count=None)
    np.testing.assert_array_equal(as_bytes[:, 0], raw)
    with pytest.raises(avalon.DtypeError, match="needs a float dtype"):
        fashion_mnist(root=tmp_path, dtype=np.uint8, _expected_count=None)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        fashion_mnist("validation", root=tmp_path)


def test_standard_counts_are_checked(tmp_path, no_system_data):
    write_fake_dataset(tmp_path)
    with pytest.raises(DatasetError, match="expected 60000 images, found 12") as info:
        fashion_mnist("train", root=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    with pytest.raises(DatasetError, match="expected 10000 images, found 5"):
        fashion_mnist("test", root=tmp_path)


def test_image_and_label_counts_must_agree(tmp_path, no_system_data):
    write_fake_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DatasetError, match="holds 12 images but .*train-labels-idx1-ubyte.gz holds 11 labels"):
        fashion_mnist("train", root=tmp_path, _expected_count=None)


def test_labels_out_of_range_and_wrong_image_shape(tmp_path, no_system_data):
    write_fake_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 10, 3], np.uint8))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: label 10 is outside 0..9"):
        fashion_mnist("test", root=tmp_path, _expected_count=None)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: expected uint8 images of shape \(N, 28, 28\)"):
        fashion_mnist("train", root=tmp_path, _expected_count=None)


def test_damaged_file_is_named(tmp_path, no_system_data):
    write_fake_dataset(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DatasetError) as info:
        fashion_mnist("test", root=tmp_path, _expected_count=None)
    assert str(path) in str(info.value)


def test_missing_files_are_listed(tmp_path, no_system_data):
    write_fake_dataset(tmp_path, names=("train-images-idx3-ubyte",))
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist("train", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "train-labels-idx1-ubyte.gz (or train-labels-idx1-ubyte)" in message
    assert "train-images" not in message.split("lacks")[1].split(".")[0]
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist("test", root=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value) and "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert not fashion_mnist_available(tmp_path)


def test_nothing_found_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch, no_system_data):
    monkeypatch.setenv("AVALON_DATA", str(tmp_path / "data"))
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist("train", root=tmp_path / "mine")
    message = str(info.value)
    for place in (tmp_path / "mine", tmp_path / "mine" / "fashion-mnist", tmp_path / "data",
                  tmp_path / "data" / "fashion-mnist", tmp_path / "no-system-dir"):
        assert str(place) in message
    assert "sudo apt-get install dataset-fashion-mnist" in message and "AVALON_DATA" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, avalon.AvalonError)
    assert not fashion_mnist_available(tmp_path / "mine")


def test_constants():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert 0 < FASHION_MNIST_MEAN < 1 and 0 < FASHION_MNIST_STD < 1


# ---------------------------------------------------------------- the real data (Debian package)

@pytest.mark.skipif(not all((DEBIAN_DIR / f"{name}.gz").is_file() for name in ALL_NAMES),
                    reason=f"Fashion-MNIST is not installed in {DEBIAN_DIR} "
                           "(sudo apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_debian_package():
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = fashion_mnist(split, root=DEBIAN_DIR)
        assert images.shape == (count, 1, 28, 28) and images.dtype == np.float32
        assert labels.shape == (count,) and labels.dtype == np.int64
        assert images.min() == 0.0 and images.max() == 1.0
        # Fashion-MNIST is balanced: every class has a tenth of the examples.
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, count // 10))
        if split == "train":
            assert abs(images.mean() - FASHION_MNIST_MEAN) < 1e-5
            assert abs(images.std() - FASHION_MNIST_STD) < 1e-5
    assert fashion_mnist_available(DEBIAN_DIR)


# ---------------------------------------------------------------- MNIST: local files and downloads

@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """The gzip bytes of a fake MNIST, the checksum table for them, and a urlopen serving them."""
    served = tmp_path / "served"
    data = write_fake_dataset(served, counts=(8, 4))
    files = {p.name: p.read_bytes() for p in served.iterdir()}
    monkeypatch.setattr(mnist_module, "MNIST_MD5", {n: hashlib.md5(b).hexdigest() for n, b in files.items()})
    calls = []

    def serve(url, timeout=None):
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        if url.startswith(MNIST_MIRRORS[0]) and name in files:
            return io.BytesIO(files[name])
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    return data, files, calls


def _leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir()) if Path(directory).exists() else []


def test_mnist_downloads_verifies_and_loads(tmp_path, mirror):
    data, files, calls = mirror
    root = tmp_path / "mnist"
    images, labels = mnist(root, "train", download=True, _expected_count=None)
    assert calls == [MNIST_MIRRORS[0] + "train-images-idx3-ubyte.gz", MNIST_MIRRORS[0] + "train-labels-idx1-ubyte.gz"]
    assert _leftovers(root) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert (root / "train-images-idx3-ubyte.gz").read_bytes() == files["train-images-idx3-ubyte.gz"]
    assert images.shape == (8, 1, 28, 28) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0], data["train"][0] / np.float32(255))
    np.testing.assert_array_equal(labels, data["train"][1])
    # Present files are used as they are: no second download.
    mnist(root, "train", download=True, _expected_count=None)
    assert len(calls) == 2


def test_mnist_tries_the_next_mirror(tmp_path, mirror, monkeypatch):
    data, _, calls = mirror
    monkeypatch.setattr(mnist_module, "MNIST_MIRRORS", ("https://dead.example/mnist/",) + MNIST_MIRRORS)
    _, labels = mnist(tmp_path, "test", download=True, _expected_count=None)
    np.testing.assert_array_equal(labels, data["test"][1])
    assert calls[:2] == ["https://dead.example/mnist/t10k-images-idx3-ubyte.gz",
                         MNIST_MIRRORS[0] + "t10k-images-idx3-ubyte.gz"]


def test_mnist_refused_download_explains_the_manual_route(tmp_path, monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    root = tmp_path / "mnist"
    with pytest.raises(DatasetError) as info:
        mnist(root, "train", download=True)
    message = str(info.value)
    assert "MNIST download failed for train-images-idx3-ubyte.gz" in message
    for mirror_url in MNIST_MIRRORS:
        assert mirror_url + "train-images-idx3-ubyte.gz" in message
    assert "Temporary failure in name resolution" in message
    assert "place the files manually" in message and str(root) in message
    manual = message.split("place the files manually")[1]
    assert "train-images-idx3-ubyte.gz" in manual and "train-labels-idx1-ubyte.gz" in manual
    assert _leftovers(root) == []


def test_mnist_rejects_a_corrupted_download(tmp_path, mirror, monkeypatch):
    _, files, calls = mirror
    corrupted = bytearray(files["t10k-labels-idx1-ubyte.gz"])
    corrupted[-1] ^= 1
    monkeypatch.setitem(files, "t10k-labels-idx1-ubyte.gz", bytes(corrupted))
    with pytest.raises(DatasetError, match="checksum mismatch: expected MD5") as info:
        mnist(tmp_path / "m", "test", download=True)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    # The good file stays; the corrupted one (and its temporary file) is gone.
    assert _leftovers(tmp_path / "m") == ["t10k-images-idx3-ubyte.gz"]


def test_mnist_without_download(tmp_path, mirror):
    _, _, calls = mirror
    with pytest.raises(DatasetNotFoundError) as info:
        mnist(tmp_path, "test")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "download=True" in message
    assert "place the files manually" in message
    assert calls == []
    # Files placed by hand, uncompressed, load with no checksum.
    data = write_fake_dataset(tmp_path, counts=(3, 2), compress=False, seed=5)
    _, labels = mnist(tmp_path, "test", _expected_count=None)
    np.testing.assert_array_equal(labels, data["test"][1])
    with pytest.raises(DatasetError, match="expected 10000 images, found 2"):
        mnist(tmp_path, "test")
    assert calls == []


def test_mnist_checksum_table(tmp_path):
    assert sorted(MNIST_MD5) == sorted(f"{name}.gz" for name in ALL_NAMES)
    assert all(len(digest) == 32 and int(digest, 16) >= 0 for digest in MNIST_MD5.values())
    assert MNIST_MIRRORS[0].startswith("https://")
    with pytest.raises(DatasetError, match="no checksum recorded for 'extra.gz'"):
        mnist_module.download_file(tmp_path, "extra.gz")


# ---------------------------------------------------------------- the install script

def _fake_bin(tmp_path, uid, apt_get=None):
    """A PATH directory holding only `cat`, an `id` reporting `uid`, and optionally an `apt-get` script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("cat"), bin_dir / "cat")
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    if apt_get is not None:
        (bin_dir / "apt-get").write_text("#!/bin/sh\n" + apt_get)
    for tool in bin_dir.iterdir():
        if not tool.is_symlink():
            tool.chmod(0o755)
    return bin_dir


def _run_script(bin_dir, system_dir, avalon_data=None):
    env = {"PATH": str(bin_dir), "FASHION_MNIST_SYSTEM_DIR": str(system_dir), "APT_LOG": str(bin_dir / "apt.log")}
    if avalon_data is not None:
        env["AVALON_DATA"] = str(avalon_data)
    return subprocess.run(["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


FAKE_APT_GET = """echo "$*" >> "$APT_LOG"
if [ "$1" = install ]; then
    for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        : > "$FASHION_MNIST_SYSTEM_DIR/$name.gz"
    done
fi
"""


def test_script_installs_with_apt_get_as_root_once(tmp_path):
    system_dir = tmp_path / "system"
    system_dir.mkdir()
    bin_dir = _fake_bin(tmp_path, 0, FAKE_APT_GET)
    result = _run_script(bin_dir, system_dir)
    assert result.returncode == 0, result.stderr
    assert (bin_dir / "apt.log").read_text().splitlines() == [
        "update", "install -y --no-install-recommends dataset-fashion-mnist"]
    assert f"installed in {system_dir}" in result.stdout
    second = _run_script(bin_dir, system_dir)  # idempotent: the files are there now
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert len((bin_dir / "apt.log").read_text().splitlines()) == 2


def test_script_is_a_no_op_when_avalon_data_holds_the_files(tmp_path):
    write_fake_dataset(tmp_path / "data" / "fashion-mnist", compress=False)
    bin_dir = _fake_bin(tmp_path, 0, FAKE_APT_GET)
    result = _run_script(bin_dir, tmp_path / "absent", avalon_data=tmp_path / "data")
    assert result.returncode == 0 and "already installed" in result.stdout
    assert not (bin_dir / "apt.log").exists()


@pytest.mark.parametrize("uid, apt_get, reason", [
    (1000, FAKE_APT_GET, "not running as root"),
    (0, None, "apt-get is not available"),
    (0, 'echo "$*" >> "$APT_LOG"; exit 100\n', "apt-get failed"),
])
def test_script_explains_and_exits_0_when_it_cannot_install(tmp_path, uid, apt_get, reason):
    system_dir = tmp_path / "system"
    system_dir.mkdir()
    bin_dir = _fake_bin(tmp_path, uid, apt_get)
    result = _run_script(bin_dir, system_dir)
    assert result.returncode == 0
    assert reason in result.stdout
    assert "sudo apt-get install dataset-fashion-mnist" in result.stdout and "AVALON_DATA" in result.stdout
    assert _leftovers(system_dir) == []
