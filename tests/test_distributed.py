"""avalon.distributed: data-parallel training on 2 ranks (mpirun) matches one
process on the same global batches; SyncBatchNorm matches BatchNorm on the
global batch; shards are disjoint and cover each epoch; faults end the job
promptly naming the rank; a world of one runs without MPI; the NCCL backend's
plumbing against a fake cupy.

Tolerances: the 2-rank runs sum each batch's gradient in two halves and add
them in the all-reduce (float32): a different summation order from one
process, so values agree to rtol 1e-4 / atol 1e-5 (after a few steps of
training), not bitwise.

Every multi-process job is one mpirun launch (all training scenarios in one,
plus one per fault): together about 15 s on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import avalon
import avalon.distributed as dist
from avalon.distributed import _world

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_job as job  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
SCENARIOS = ["train_mlp", "train_cnn", "sync_bn", "shards", "fit", "checkpoint"]


def _mpi_missing():
    if shutil.which("mpirun") is None:
        return "mpirun not found (Open MPI: apt-get install openmpi-bin libopenmpi-dev; nox -s tests installs it as root)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (python -m pip install mpi4py)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def mpirun(out, *scenarios, timeout=120, env=None):
    """Run distributed_job.py on 2 ranks; (returncode, output, seconds)."""
    paths = [str(p) for p in sorted((HERE.parent / "packages").glob("*/src"))]
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
                   **(env or {}))
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root"]
    for name in ("PYTHONPATH", *(env or {})):
        cmd += ["-x", name]
    cmd += [sys.executable, str(HERE / "distributed_job.py"), str(out), *scenarios]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ)
    return r.returncode, r.stdout + r.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    code, output, _ = mpirun(out, *SCENARIOS)
    assert code == 0, output[-4000:]
    read = lambda name, rank: dict(np.load(out / f"{name}.rank{rank}.npz"))  # noqa: E731
    read.output = output
    return read


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


@needs_mpi
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_two_ranks_train_as_one_process_on_the_global_batch(two_ranks, kind):
    want = job.train(kind)  # one process, the whole global batches, rank 0's init
    for rank in (0, 1):
        _assert_same(two_ranks(f"train_{kind}", rank), want)
    assert want["losses"][-1] != want["losses"][0]  # it trained


@needs_mpi
def test_sync_batch_norm_matches_batch_norm_on_the_global_batch(two_ranks):
    want = job.sync_bn()  # BatchNorm2d on 7 examples; the ranks hold 4 and 3 of them
    for rank in (0, 1):
        _assert_same(two_ranks("sync_bn", rank), want)
        assert f"rank {rank} refused ragged SyncBatchNorm shards (state unchanged: True)" in two_ranks.output


@needs_mpi
def test_shards_are_disjoint_cover_each_epoch_and_share_the_seed(two_ranks):
    r0, r1 = two_ranks("shards", 0), two_ranks("shards", 1)
    for e in range(2):
        np.testing.assert_array_equal(r0[f"order{e}"], r1[f"order{e}"])
        assert not set(r0[f"epoch{e}"]) & set(r1[f"epoch{e}"])
        assert sorted(np.concatenate([r0[f"epoch{e}"], r1[f"epoch{e}"]])) == list(range(50))
    assert not np.array_equal(r0["order0"], r0["order1"])  # a new order each epoch


@needs_mpi
def test_distributed_fit_matches_one_process_fit(two_ranks):
    want = job.fit_mlp(False)
    for rank in (0, 1):
        _assert_same(two_ranks("fit", rank), want)
    assert two_ranks.output.count("epoch 2/2  loss=") == 1  # rank 0 reports, rank 1 stays quiet


@needs_mpi
def test_rank_zero_checkpoint_loads_identically_on_every_rank(two_ranks):
    want = {k: np.asarray(v) for k, v in job.model("mlp", seed=0).state_dict().items()}
    for rank in (0, 1):
        got = two_ranks("checkpoint", rank)
        assert str(got["failure"]) == "FileNotFoundError"
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@needs_mpi
@pytest.mark.parametrize("scenario, says", [
    ("raise_on_rank1", "rank 1 of 2 failed with RuntimeError: deliberate failure on rank 1"),
    ("kill_rank1", "process rank 1 with PID"),  # mpirun: "... exited on signal 9 (Killed)"
])
def test_a_failing_rank_ends_the_job_promptly_naming_it(tmp_path, scenario, says):
    code, output, seconds = mpirun(tmp_path, scenario, timeout=60)
    assert code != 0
    assert says in output, output[-3000:]
    assert seconds < 30


@needs_mpi
def test_a_collective_that_waits_past_the_timeout_aborts_the_job(tmp_path):
    code, output, seconds = mpirun(tmp_path, "rank1_stalls", timeout=60, env={"AVALON_DISTRIBUTED_TIMEOUT": "2"})
    assert code != 0
    assert "rank 0: barrier did not complete within 2 s" in output, output[-3000:]
    assert seconds < 30


# -- one process, no MPI ------------------------------------------------------------------------

def test_a_world_of_one_needs_no_mpi(tmp_path):
    code = ("import sys, numpy as np, avalon.distributed as d; sys.path.insert(0, %r); import distributed_job as j;"
            "r = j.train('mlp'); d.init(); assert d.world_size() == 1 and d.rank() == 0 and d.is_initialized();"
            "assert 'mpi4py' not in sys.modules; g = {'w': np.ones(2, np.float32)};"
            "assert d.all_reduce(g, op='mean')['w'].tolist() == [1, 1]; print('ok', r['losses'].size)") % str(HERE)
    env = {k: v for k, v in os.environ.items() if k not in _world._LAUNCHER_VARIABLES}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["ok", str(job.STEPS)], r.stderr[-3000:]


class MirrorWorld:
    """Two ranks holding the same values (sum doubles, mean keeps), in one process."""
    name, rank, size = "mirror", 0, 2

    def all_reduce_(self, buf, op):
        if op == "sum":
            buf *= 2
        return buf

    def broadcast_(self, buf, src):
        return buf

    def broadcast_object(self, obj, src=0):
        return obj

    def all_gather(self, buf):
        return [buf.copy(), buf.copy()]

    def barrier(self):
        pass


@pytest.fixture
def mirror_world():
    _world._reset_for_tests(MirrorWorld())
    yield
    _world._reset_for_tests(None)


def test_sync_batch_norm_in_a_compiled_gradient_runs_its_all_reduces_once_in_one_thread(mirror_world):
    """Two identical shards: SyncBatchNorm's loss and gradients equal BatchNorm's
    on the doubled batch, through process_all_reduce and its VJP."""
    import avalon.nn as nn
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, 6)
    avalon.manual_seed(0)
    sync = job.BNNet(nn.SyncBatchNorm)
    step = avalon.value_and_grad(job.loss_fn, argnums=0)
    loss, grads = step(sync, x, y)
    assert sum(n.op == "process_all_reduce" for n in step.graph.nodes) == 4  # 2 forward, 2 in the VJP
    assert type(step._last().compiled).__name__ != "ShardedFunction"
    _world._reset_for_tests(None)
    avalon.manual_seed(0)
    plain = job.BNNet(nn.BatchNorm2d)
    want_loss, want = avalon.grad(job.loss_fn, plain, np.concatenate([x, x]), np.concatenate([y, y]))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for (k, g), (_, w) in zip(grads[0].named_parameters(), want[0].named_parameters()):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(sync.bn.running_var, plain.bn.running_var, rtol=1e-5)


def test_collectives_keep_the_tree_and_check_their_arguments(mirror_world):
    tree = {"a": np.ones((2, 3), np.float32), "b": [np.arange(3), None]}
    out = dist.all_reduce(tree, op="sum")
    assert out["a"].shape == (2, 3) and out["b"][1] is None and out["b"][0].tolist() == [0, 2, 4]
    assert tree["a"].tolist() == [[1, 1, 1]] * 2  # the input is unchanged
    with pytest.raises(dist.DistributedError, match="cast them to a float dtype"):
        dist.all_reduce(np.arange(3), op="mean")
    with pytest.raises(ValueError, match="op must be"):
        dist.all_reduce(tree, op="min")
    with pytest.raises(ValueError, match="src must be a rank"):
        dist.broadcast(tree, src=2)
    assert len(dist.all_gather(np.ones(2))) == 2


def test_average_gradients_weights_each_rank_by_its_examples(mirror_world):
    loss, grads = dist.average_gradients(np.float32(2.0), {"w": np.full(3, 4.0, np.float32)}, examples=5)
    assert float(loss) == 2.0 and grads["w"].tolist() == [4, 4, 4]
    with pytest.raises(dist.DistributedError, match="one dtype"):
        dist.average_gradients(np.float32(1.0), {"w": np.ones(2, np.float64)})


def test_local_rank_reads_the_launcher(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert dist.local_rank() == 3
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_RANK")
    assert dist.local_rank() == 0 or any(v in os.environ for v in ("MPI_LOCALRANKID", "MPI_LOCAL_RANK"))


def test_mpi_and_nccl_missing_name_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(dist.DistributedError, match="pip install mpi4py"):
        dist.MPIBackend(timeout=1)
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(dist.DistributedError, match="cupy-cuda12x"):
        dist.NCCLBackend(MirrorWorld())


class _Ptr(np.ndarray):
    """A NumPy array standing in for a CuPy array: .data.ptr is its address."""
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _fake_cupy(calls):
    class Comm:
        def __init__(self, n, uid, rank):
            calls.append(("comm", n, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):
            calls.append(("allReduce", send == recv, count, dtype, op, stream))

        def bcast(self, buf, count, dtype, root, stream):
            calls.append(("bcast", count, dtype, root))

    nccl = types.SimpleNamespace(NcclCommunicator=Comm, get_unique_id=lambda: (7,) * 128, NCCL_SUM=0, NCCL_MAX=2,
                                 NCCL_FLOAT32=7, available=True)
    stream = types.SimpleNamespace(ptr=99)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(nccl=nccl, get_current_stream=lambda: stream))


def test_nccl_backend_plumbing_with_a_fake_cupy():
    """Not run on a GPU: checks the calls made against CuPy's documented API."""
    calls = []
    host = MirrorWorld()
    sent = []
    host.broadcast_object = lambda obj, src=0: sent.append((obj, src)) or obj
    nccl = dist.NCCLBackend(host, cupy=_fake_cupy(calls))
    assert sent == [((7,) * 128, 0)] and calls[0] == ("comm", 2, (7,) * 128, 0)
    buf = np.full(4, 3.0, np.float32).view(_Ptr)
    nccl.all_reduce_(buf, "mean")
    assert calls[1] == ("allReduce", True, 4, 7, 0, 99) and buf.tolist() == [1.5] * 4
    nccl.broadcast_(buf, 1)
    assert calls[2] == ("bcast", 4, 7, 1)
    with pytest.raises(dist.DistributedError, match="NCCL has no float16"):
        nccl.all_reduce_(np.ones(2, np.float16).view(_Ptr), "sum")


def test_a_graph_holding_a_collective_is_never_split_across_threads(mirror_world):
    from avalon.passes.sharding import split_batch, split_components
    big = np.zeros((1000, 1000), np.float32)

    def two_parts(a, b, collective):
        first = dist.all_reduce(a * 2.0) if collective else a * 2.0
        return avalon.sum(first), avalon.sum(b * 3.0)

    assert split_components(avalon.trace(lambda a, b: two_parts(a, b, False), big, big), 2) is not None
    graph = avalon.trace(lambda a, b: two_parts(a, b, True), big, big)
    assert split_components(graph, 2) is None
    assert split_batch(graph, set(graph.inputs), 2) is None


def test_convert_sync_batchnorm_keeps_the_arrays_and_the_state_dict():
    import avalon.nn as nn
    avalon.manual_seed(0)
    model = job.BNNet(nn.BatchNorm2d)
    before = model.state_dict()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted.bn, nn.SyncBatchNorm) and converted.bn.weight is before["bn.weight"]
    assert list(converted.state_dict()) == list(before)
    with pytest.raises(ValueError, match="process_group must be None"):
        nn.SyncBatchNorm(4, process_group=object())
