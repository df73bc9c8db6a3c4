"""Collective backends: one process (no MPI), MPI (mpi4py) and NCCL (CuPy).

Each backend offers the same in-place operations on one contiguous buffer:
all_reduce_(buf, op), broadcast_(buf, src), all_gather(buf), barrier() and
broadcast_object(obj, src).  The tree-level collectives (avalon.distributed)
pack a tree's arrays into one buffer per dtype and call these.

Every MPI operation is non-blocking and waited for with a deadline
(`timeout`, seconds): a rank that died or stopped calling collectives ends
the job with an error naming the rank that timed out, never a silent hang.
"""
from __future__ import annotations

import os
import pickle
import sys
import time

import numpy as np

from ..errors import AvalonError

#: how a user gets the MPI backend
MPI_INSTALL_HINT = ("install Open MPI and mpi4py: `apt-get install openmpi-bin libopenmpi-dev` (Debian/Ubuntu; "
                    "or your cluster's MPI module) then `python -m pip install mpi4py`, and start the job with "
                    "`mpirun -n N python train.py`")
NCCL_INSTALL_HINT = ("install CuPy with NCCL for your CUDA version (`python -m pip install cupy-cuda12x`, then "
                     "`python -m cupyx.tools.install_library --library nccl --cuda 12.x`) and avalon-cuda")

REDUCE_OPS = ("sum", "mean", "max")


class DistributedError(AvalonError, RuntimeError):
    """A collective could not run: a missing dependency, a mismatch between
    ranks, a timeout."""


class LocalBackend:
    """The world of one process: every collective is the identity."""
    name = "local"
    rank, size = 0, 1

    def all_reduce_(self, buf, op):
        return buf

    def broadcast_(self, buf, src):
        return buf

    def all_gather(self, buf):
        return [buf.copy()]

    def barrier(self):
        pass

    def broadcast_object(self, obj, src=0):
        return obj

    def abort(self, code=1):
        os._exit(code)


def _poll(request, what, rank, timeout):
    """Wait for an MPI request, sleeping a little between tests so a waiting
    rank leaves the CPU to the others; past `timeout` seconds, abort the job."""
    deadline = time.monotonic() + timeout
    pause = 0.0
    while not request.Test():
        if time.monotonic() > deadline:
            _abort_on_timeout(what, rank, timeout)
        time.sleep(pause)
        pause = min(1e-3, pause + 2e-5)


def _abort_on_timeout(what, rank, timeout):
    from mpi4py import MPI
    print(f"avalon.distributed: rank {rank}: {what} did not complete within {timeout:g} s (another rank "
          "failed, was killed, or stopped calling the same collectives in the same order); aborting the job",
          file=sys.stderr, flush=True)
    MPI.COMM_WORLD.Abort(1)


class MPIBackend:
    """Collectives over mpi4py's COMM_WORLD (CPU arrays: NumPy buffers)."""
    name = "mpi"

    def __init__(self, timeout):
        self.MPI = import_mpi()
        self.comm = self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout
        self._ops = {"sum": self.MPI.SUM, "mean": self.MPI.SUM, "max": self.MPI.MAX}

    def _wait(self, request, what):
        _poll(request, what, self.rank, self.timeout)

    def all_reduce_(self, buf, op):
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, self._ops[op]), f"all_reduce(op={op!r})")
        if op == "mean":
            buf /= self.size
        return buf

    def broadcast_(self, buf, src):
        self._wait(self.comm.Ibcast(buf, root=src), f"broadcast(src={src})")
        return buf

    def all_gather(self, buf):
        out = np.empty((self.size,) + buf.shape, buf.dtype)
        self._wait(self.comm.Iallgather(buf, out), "all_gather")
        return list(out)

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "barrier")

    def broadcast_object(self, obj, src=0):
        """Any picklable object from rank `src` to every rank (two broadcasts:
        the size, then the bytes), under the same deadline as the others."""
        data = np.frombuffer(pickle.dumps(obj), np.uint8) if self.rank == src else None
        size = np.array([data.size if data is not None else 0], np.int64)
        self.broadcast_(size, src)
        if data is None:
            data = np.empty(int(size[0]), np.uint8)
        else:
            data = data.copy()  # frombuffer's array is read-only
        self.broadcast_(data, src)
        return obj if self.rank == src else pickle.loads(data.tobytes())

    def abort(self, code=1):
        self.comm.Abort(code)


def import_mpi():
    """mpi4py's MPI module, or a DistributedError saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(f"avalon.distributed needs mpi4py for more than one process ({e}); "
                               f"{MPI_INSTALL_HINT}") from None
    return MPI


class NCCLBackend:
    """Collectives over NCCL (CuPy arrays), written against CuPy's documented
    cupy.cuda.nccl API; the communicator's unique id travels over MPI (`host`).

    Not yet run on a GPU: its tests check the plumbing with a fake cupy."""
    name = "nccl"

    def __init__(self, host, cupy=None):
        self.cupy = cupy if cupy is not None else import_cupy_nccl()
        self.nccl = self.cupy.cuda.nccl
        self.host = host
        self.rank, self.size = host.rank, host.size
        uid = self.nccl.get_unique_id() if host.rank == 0 else None
        uid = host.broadcast_object(uid, 0)
        self.comm = self.nccl.NcclCommunicator(host.size, uid, host.rank)
        self._ops = {"sum": self.nccl.NCCL_SUM, "mean": self.nccl.NCCL_SUM, "max": self.nccl.NCCL_MAX}

    def _dtype(self, dtype):
        name = "NCCL_" + np.dtype(dtype).name.upper()
        code = getattr(self.nccl, name, None)
        if code is None:
            raise DistributedError(f"NCCL has no {np.dtype(dtype).name} type; cast the arrays to float32 "
                                   "(or another NCCL type) first")
        return code

    def _stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def all_reduce_(self, buf, op):
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf.dtype), self._ops[op],
                            self._stream())
        if op == "mean":
            buf /= self.size
        return buf

    def broadcast_(self, buf, src):
        self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf.dtype), src, self._stream())
        return buf

    def all_gather(self, buf):
        out = self.cupy.empty((self.size,) + tuple(buf.shape), buf.dtype)
        self.comm.allGather(buf.data.ptr, out.data.ptr, buf.size, self._dtype(buf.dtype), self._stream())
        return [out[k] for k in range(self.size)]

    def barrier(self):
        self.cupy.cuda.get_current_stream().synchronize()
        self.host.barrier()

    def broadcast_object(self, obj, src=0):
        return self.host.broadcast_object(obj, src)

    def abort(self, code=1):
        self.comm.abort()
        self.host.abort(code)


def import_cupy_nccl():
    """cupy with its NCCL bindings, or a DistributedError saying what to install."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:
        raise DistributedError(f"avalon.distributed needs CuPy with NCCL for CuPy arrays ({e}); "
                               f"{NCCL_INSTALL_HINT}") from None
    if not getattr(nccl, "available", True):
        raise DistributedError(f"CuPy was built without NCCL; {NCCL_INSTALL_HINT}")
    return cupy
