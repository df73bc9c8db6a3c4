"""avalon.distributed: data-parallel training over MPI (CPU arrays) and NCCL
(CuPy arrays).

    import avalon.distributed as dist
    dist.init()                               # under `mpirun -n N python train.py`: N ranks; else one
    dist.rank(), dist.world_size(), dist.local_rank()   # local_rank: the GPU a rank's CuPy arrays go on
    grads = dist.all_reduce(grads, op="mean") # any tree of arrays, as torch.distributed names them
    dist.broadcast(model, src=0)              # in place
    parts = dist.all_gather(x)                # [rank 0's x, rank 1's x, ...]
    step = dist.DataParallel(loss_fn)         # DDP's semantics around a compiled gradient function

The collectives go over MPI (mpi4py) for NumPy arrays and over NCCL
(cupy.cuda.nccl, its unique id sent over MPI) for CuPy arrays, behind one
interface (avalon.distributed.backends).  Without an MPI launcher the world is
one process and every collective is the identity: the same script runs
unchanged with and without mpirun.

Faults: an uncaught exception on any rank aborts the whole job (MPI_Abort)
after printing which rank failed; a collective that waits longer than the
timeout (init(timeout=...), AVALON_DISTRIBUTED_TIMEOUT, default 300 s) aborts
the job naming the rank that waited; a killed rank ends the job through
mpirun, which names the rank that died.
"""
from __future__ import annotations

from . import ops  # noqa: F401  (registers process_all_reduce)
from ._world import init, is_initialized, launched_by_mpi, local_rank, rank, world_size
from .backends import DistributedError, LocalBackend, MPIBackend, NCCLBackend
from .collectives import all_gather, all_reduce, barrier, broadcast, broadcast_object
from .data_parallel import DataParallel, average_gradients

__all__ = ["init", "is_initialized", "rank", "world_size", "local_rank", "barrier", "all_reduce", "broadcast", "all_gather",
           "broadcast_object", "DataParallel", "average_gradients", "DistributedError", "launched_by_mpi",
           "LocalBackend", "MPIBackend", "NCCLBackend"]
