"""Batches: batch counts and sizes, pairing of x and y, per-epoch reproducible shuffling, order(), normalize, device."""
import numpy as np
import pytest

import avalon
from avalon_zoo.datasets import Batches


def dataset(n=10, features=3):
    """x[i] is filled with i, so a batch of x tells which examples it holds; y[i] = i."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], features, axis=1)
    return x, np.arange(n, dtype=np.int64)


def epoch_of(batches):
    return [(xb.copy(), yb.copy()) for xb, yb in batches]


@pytest.mark.parametrize("n, batch_size, drop_last, sizes", [
    (10, 3, False, [3, 3, 3, 1]),
    (10, 3, True, [3, 3, 3]),
    (9, 3, False, [3, 3, 3]),
    (9, 3, True, [3, 3, 3]),
    (2, 5, False, [2]),
    (2, 5, True, []),
    (0, 4, False, []),
])
def test_batch_count_and_sizes(n, batch_size, drop_last, sizes):
    x, y = dataset(n)
    batches = Batches(x, y, batch_size=batch_size, seed=0, drop_last=drop_last)
    assert len(batches) == len(sizes)
    assert [len(xb) for xb, _ in batches] == sizes


def test_unshuffled_batches_keep_the_order():
    x, y = dataset(10)
    batches = Batches(x, y, batch_size=4, shuffle=False)
    got = epoch_of(batches)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in got]), x)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in got]), y)
    np.testing.assert_array_equal(batches.order(3), np.arange(10))
    assert [len(yb) for _, yb in epoch_of(batches)] == [4, 4, 2]  # every epoch the same


def test_shuffled_epoch_is_a_permutation_following_order():
    x, y = dataset(25)
    batches = Batches(x, y, batch_size=4, seed=3)
    for epoch in range(3):
        got = epoch_of(batches)
        ys = np.concatenate([yb for _, yb in got])
        np.testing.assert_array_equal(ys, batches.order(epoch))
        np.testing.assert_array_equal(np.sort(ys), y)
        for xb, yb in got:  # x and y stay paired
            np.testing.assert_array_equal(xb[:, 0], yb)
    assert batches.epoch == 3


def test_each_epoch_reshuffles():
    batches = Batches(*dataset(50), batch_size=50, seed=1)
    first, second = (np.concatenate([yb for _, yb in batches]) for _ in range(2))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(50))


def test_same_seed_same_batches_different_seed_different_batches():
    x, y = dataset(40)
    a, b, c = (Batches(x, y, batch_size=8, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        ya, yb, yc = ([y_ for _, y_ in epoch_of(it)] for it in (a, b, c))
        np.testing.assert_array_equal(np.concatenate(ya), np.concatenate(yb))
        assert not np.array_equal(np.concatenate(ya), np.concatenate(yc))


def test_order_depends_only_on_seed_and_epoch():
    x, y = dataset(30)
    used = Batches(x, y, seed=11)
    for _ in range(5):
        list(used)
    fresh = Batches(x, y, seed=11)
    for epoch in range(5):
        np.testing.assert_array_equal(fresh.order(epoch), used.order(epoch))
    assert fresh.order(0).dtype == np.int64


def test_seed_none_draws_a_seed_that_reproduces_the_run():
    x, y = dataset(30)
    a = Batches(x, y, batch_size=7)
    assert isinstance(a.seed, int) and a.seed >= 0
    assert Batches(x, y).seed != a.seed
    replay = Batches(x, y, batch_size=7, seed=a.seed)
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate([yb for _, yb in a]), np.concatenate([yb for _, yb in replay]))


def test_batches_of_an_epoch_and_resuming():
    x, y = dataset(20)
    batches = Batches(x, y, batch_size=6, seed=2)
    third = [yb for _, yb in batches.batches(2)]
    assert batches.epoch == 0  # batches(e) does not advance
    batches.epoch = 2
    for got, want in zip((yb for _, yb in batches), third, strict=True):
        np.testing.assert_array_equal(got, want)
    assert batches.epoch == 3


def test_order_drives_another_framework_to_the_same_batches():
    torch = pytest.importorskip("torch")
    x, y = dataset(23)
    batches = Batches(x, y, batch_size=5, seed=4, drop_last=True)
    for epoch in range(2):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                                             batch_size=5, sampler=batches.order(epoch).tolist(), drop_last=True)
        ours = list(batches)
        assert len(ours) == len(loader) == 4
        for (xb, yb), (tx, ty) in zip(ours, loader, strict=True):
            np.testing.assert_array_equal(xb, tx.numpy())
            np.testing.assert_array_equal(yb, ty.numpy())


def test_x_alone():
    x, _ = dataset(7)
    got = list(Batches(x, batch_size=3, shuffle=False))
    assert [type(b) for b in got] == [np.ndarray] * 3
    np.testing.assert_array_equal(np.concatenate(got), x)


def test_normalize_with_mean_and_std_on_raw_pixels():
    pixels = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2) * 10
    mean, std = np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1), np.array([2.0, 4.0, 8.0]).reshape(3, 1, 1)
    (xb,) = Batches(pixels, batch_size=2, shuffle=False, normalize=(mean, std))
    assert xb.dtype == np.float32
    np.testing.assert_allclose(xb, (pixels.astype(np.float64) - mean) / std, rtol=1e-6)
    assert pixels.max() == 230  # the data itself is untouched


def test_normalize_keeps_a_float_dtype_and_takes_callables():
    x, y = dataset(6)
    (xb, _), = Batches(x.astype(np.float64), y, batch_size=6, shuffle=False, normalize=(0.5, 2.0))
    assert xb.dtype == np.float64
    np.testing.assert_array_equal(xb, (x - 0.5) / 2.0)
    (xb, yb), = Batches(x, y, batch_size=6, seed=0, normalize=lambda b: b * 2)
    np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    np.testing.assert_array_equal(x[:, 0], y)


def test_device_cpu():
    x, y = dataset(5)
    batches = Batches(x, y, batch_size=2, device="cpu")
    assert batches.device == avalon.device("cpu")
    xb, yb = next(iter(batches))
    assert isinstance(xb, np.ndarray) and isinstance(yb, np.ndarray)
    with pytest.raises(avalon.DeviceError):
        Batches(x, y, device="no-such-device")


def test_bad_arguments():
    x, y = dataset(5)
    with pytest.raises(avalon.ShapeError, match="x holds 5 examples .* but y holds 4"):
        Batches(x, y[:4])
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            Batches(x, y, batch_size=bad)
    with pytest.raises(TypeError):
        Batches(x, y, batch_size=2.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        Batches(x, y, seed=-1)
    with pytest.raises(TypeError, match="normalize must be None, a callable or \\(mean, std\\)"):
        Batches(x, y, normalize=0.5)
    with pytest.raises(ValueError, match="std must be nonzero"):
        Batches(x, y, normalize=(0.0, 0.0))
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        Batches(x, y).order(-1)


def test_repr():
    text = repr(Batches(*dataset(10), batch_size=4, seed=5))
    assert "10 examples" in text and "batch_size=4" in text and "3 batches" in text and "seed=5" in text


# -- data-parallel shards (avalon.distributed) ------------------------------------------------------

@pytest.mark.parametrize("world, n, batch_size, drop_last", [
    (2, 20, 6, False), (2, 20, 6, True), (2, 18, 6, False), (3, 21, 6, False), (3, 20, 6, True), (3, 9, 9, False)])
def test_rank_shards_rebuild_the_one_process_batches(world, n, batch_size, drop_last):
    """Each global batch is the same for any world size; the ranks' shards of it are
    disjoint, cover it, and the shards of an epoch cover the epoch."""
    x, y = dataset(n)
    whole = Batches(x, y, batch_size=batch_size, seed=4, drop_last=drop_last)
    ranks = [Batches(x, y, batch_size=batch_size, seed=4, drop_last=drop_last, num_replicas=world, rank=r)
             for r in range(world)]
    for epoch in range(2):
        per_rank = [list(b.batches(epoch)) for b in ranks]
        seen = []
        for i, (xb, yb) in enumerate(whole.batches(epoch)):
            shards = [per_rank[r][i][1] for r in range(world)]
            assert all(len(s) >= 1 for s in shards)
            np.testing.assert_array_equal(np.concatenate(shards), yb)
            seen.extend(yb)
        assert len(seen) == len(set(seen)) == (n // batch_size * batch_size if drop_last else n)
    assert all(len(b) == len(whole) for b in ranks)


def test_a_batch_too_small_to_shard_is_refused_with_a_remedy():
    x, y = dataset(13)
    with pytest.raises(ValueError, match="cannot be split among 2 ranks.*drop_last=True"):
        Batches(x, y, batch_size=4, num_replicas=2, rank=0)  # last batch: 1 example
    assert len(Batches(x, y, batch_size=4, drop_last=True, num_replicas=2, rank=1)) == 3
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        Batches(x, y, batch_size=4, drop_last=True, num_replicas=2, rank=2)


def test_one_process_is_the_default_and_the_repr_names_the_rank():
    x, y = dataset(8)
    assert "rank" not in repr(Batches(x, y, batch_size=4, seed=0))
    assert "rank 1 of 2" in repr(Batches(x, y, batch_size=4, seed=0, num_replicas=2, rank=1))
