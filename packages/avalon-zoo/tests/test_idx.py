"""IDX files: write_idx/read_idx round trips, the byte layout, and every kind of damage raising DatasetError."""
import gzip
import os

import numpy as np
import pytest

import avalon
from avalon_zoo.datasets import DatasetError, DatasetNotFoundError, read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype, shape):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
        a.flat[:2] = [info.min, info.max][: a.size]  # the extremes survive the round trip
        return a
    a = rng.standard_normal(shape).astype(dtype)
    a.flat[:3] = [np.inf, -0.0, np.finfo(dtype).tiny][: a.size]
    return a


def _header(code, dims):
    return bytes([0, 0, code, len(dims)]) + np.asarray(dims, ">u4").tobytes()


def _write_bytes(path, data, compress=False):
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (0, 28, 28), (2, 1, 3, 1)])
def test_round_trip(tmp_path, dtype, compress, shape):
    a = _sample(dtype, shape)
    path = write_idx(tmp_path / "a.idx", a, gzip=compress)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == shape
    np.testing.assert_array_equal(b, a)
    assert b.flags.writeable and b.flags.c_contiguous
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress


def test_round_trip_of_big_endian_and_strided_input(tmp_path):
    a = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", a)), a)


def test_raw_byte_layout(tmp_path):
    write_idx(tmp_path / "u8", np.array([[1, 2, 3]], np.uint8), gzip=False)
    assert (tmp_path / "u8").read_bytes() == bytes.fromhex("00000802 00000001 00000003 010203")
    write_idx(tmp_path / "i16", np.array([-2, 258], np.int16), gzip=False)
    assert (tmp_path / "i16").read_bytes() == bytes.fromhex("00000B01 00000002 FFFE 0102")
    write_idx(tmp_path / "f64", np.array([1.0]), gzip=False)
    assert (tmp_path / "f64").read_bytes() == bytes.fromhex("00000E01 00000001 3FF0000000000000")


def test_compression_is_detected_by_content_not_name(tmp_path):
    a = np.arange(10, dtype=np.int32)
    write_idx(tmp_path / "looks-raw.idx", a, gzip=True)
    write_idx(tmp_path / "looks-compressed.gz", a, gzip=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks-raw.idx"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks-compressed.gz"), a)


def test_gzip_output_is_deterministic_and_write_leaves_no_temporary_file(tmp_path):
    a = _sample(np.float32, (5, 5))
    first = write_idx(tmp_path / "a.gz", a).read_bytes()
    assert write_idx(tmp_path / "a.gz", a).read_bytes() == first  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["a.gz"]


def test_dataset_errors_are_avalon_errors():
    assert issubclass(DatasetError, avalon.AvalonError)
    assert issubclass(DatasetNotFoundError, DatasetError) and issubclass(DatasetNotFoundError, FileNotFoundError)


GOOD = _header(0x08, [2, 3]) + bytes(range(6))

CORRUPTIONS = {
    "empty": (b"", "fewer than the 4-byte magic number"),
    "short magic": (b"\x00\x00", "fewer than the 4-byte magic number"),
    "bad magic": (b"\x01\x00\x08\x01" + GOOD[4:], "bad magic number 0x01000801"),
    "text file": (b"hello world\n", "bad magic number 0x68656c6c"),
    "unknown type": (_header(0x0A, [6]) + bytes(6), "unknown IDX type code 0x0A"),
    "zero dims": (b"\x00\x00\x08\x00", "declares 0 dimensions"),
    "truncated header": (GOOD[:9], "truncated IDX header: 2 dimensions need 8 bytes"),
    "truncated data": (GOOD[:-1], "truncated IDX data: shape (2, 3) of uint8 needs 6 data bytes"),
    "no data": (GOOD[:12], "holds 0 (12 in all)"),
    "oversized": (GOOD + b"\x00\x00", "oversized IDX data: shape (2, 3) of uint8 needs 6 data bytes"),
    "truncated int32": (_header(0x0C, [3]) + bytes(11),
                        "needs 12 data bytes after the 8-byte header (20 bytes in all)"),
    "absurd dims": (_header(0x0E, [2**32 - 1, 2**32 - 1]) + bytes(8), "truncated IDX data"),
}


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_files_raise_dataset_error_naming_the_file(tmp_path, case, compress):
    data, message = CORRUPTIONS[case]
    path = _write_bytes(tmp_path / f"damaged-{case.replace(' ', '-')}.idx", data, compress)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    if " holds " in str(info.value):  # sizes are of what was read: the file, or its decompressed content
        assert ("the decompressed data holds" if compress else "the file holds") in str(info.value)


def test_size_message_gives_expected_and_actual_bytes(tmp_path):
    path = _write_bytes(tmp_path / "short.idx", _header(0x0D, [4, 2]) + bytes(20))
    with pytest.raises(DatasetError, match=r"needs 32 data bytes after the 12-byte header \(44 bytes in all\), "
                                           r"the file holds 20 \(32 in all\)"):
        read_idx(path)


def _gzipped_good():
    return gzip.compress(_header(0x08, [1000]) + bytes(range(250)) * 4, mtime=0)


def test_truncated_gzip_stream(tmp_path):
    path = _write_bytes(tmp_path / "cut.gz", _gzipped_good()[:-12])
    with pytest.raises(DatasetError, match="corrupt or truncated gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_crc_mismatch(tmp_path):
    data = bytearray(_gzipped_good())
    data[-8] ^= 0xFF  # the CRC-32 of the uncompressed data, in the trailer
    path = _write_bytes(tmp_path / "crc.gz", bytes(data))
    with pytest.raises(DatasetError, match="corrupt or truncated gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_deflate_data(tmp_path):
    data = bytearray(_gzipped_good())
    data[10] = 0xFF  # the first deflate block header: 0b11 is an invalid block type
    path = _write_bytes(tmp_path / "bad-block.gz", bytes(data))
    with pytest.raises(DatasetError, match="corrupt or truncated gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_bad_gzip_header(tmp_path):
    path = _write_bytes(tmp_path / "bad-header.gz", b"\x1f\x8b\x07" + bytes(20))  # method 7 is not deflate
    with pytest.raises(DatasetError, match="corrupt or truncated gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no such file") as info:
        read_idx(tmp_path / "absent.gz")
    assert str(tmp_path / "absent.gz") in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read") as info:
        read_idx(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.float16, np.bool_, np.complex64])
def test_write_rejects_dtypes_idx_cannot_store(tmp_path, dtype):
    with pytest.raises(avalon.DtypeError, match="IDX cannot store dtype"):
        write_idx(tmp_path / "a", np.zeros(3, dtype))
    assert os.listdir(tmp_path) == []


def test_write_rejects_scalars(tmp_path):
    with pytest.raises(DatasetError, match="1 to 255 dimensions, not 0"):
        write_idx(tmp_path / "a", np.float32(1.0))
