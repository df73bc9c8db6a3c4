"""The process's place in the job: its rank, the world size and the backends.

init() picks the host backend: MPI when the process was started by an MPI
launcher (mpirun sets OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK) or when
asked for by name, else the world of one process.  The NCCL backend for CuPy
arrays is made on first use, its unique id sent over MPI.
"""
from __future__ import annotations

import os
import sys
import threading

from .backends import DistributedError, LocalBackend, MPIBackend, NCCLBackend

#: seconds a collective may wait for the other ranks before the job is aborted
DEFAULT_TIMEOUT = float(os.environ.get("AVALON_DISTRIBUTED_TIMEOUT", "300"))

_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


class _State:
    def __init__(self):
        self.host = None          # LocalBackend or MPIBackend, once initialized
        self.nccl = None          # NCCLBackend, made on first use
        self.lock = threading.Lock()
        self.previous_excepthook = None


_state = _State()


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpirun, srun with PMI) started this process."""
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


def init(backend=None, timeout=None):
    """Join the job: under `mpirun -n N` the world of N processes over MPI,
    else the world of one.  backend="mpi" insists on MPI (an error naming what
    to install when mpi4py is missing); backend="local" is the world of one.
    Calling it again returns the same world.  Installs the fault handler: an
    uncaught exception on any rank aborts the whole job, naming the rank."""
    with _state.lock:
        if _state.host is not None:
            return _state.host
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        if backend not in (None, "mpi", "local"):
            raise ValueError(f"avalon.distributed.init: backend must be None, 'mpi' or 'local', not {backend!r} "
                             "(NCCL is chosen per collective, for CuPy arrays)")
        if backend == "mpi" or (backend is None and launched_by_mpi()):
            _state.host = MPIBackend(timeout)
        else:
            _state.host = LocalBackend()
        if _state.host.size > 1:
            _install_fault_handler()
        return _state.host


def is_initialized() -> bool:
    return _state.host is not None


def host():
    """The host backend, initializing the world on first use."""
    return _state.host if _state.host is not None else init()


def rank() -> int:
    return host().rank


def world_size() -> int:
    return host().size


def local_rank() -> int:
    """This process's index among the ranks on its machine (Open MPI's
    OMPI_COMM_WORLD_LOCAL_RANK, or MPI_LOCALRANKID / MPI_LOCAL_RANK); 0 in one
    process.  Put each rank's CuPy arrays on GPU local_rank() before NCCL runs."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MPI_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def backend_for_arrays(arrays):
    """The backend for these arrays: NCCL for CuPy arrays (in a world of more
    than one process), the host backend (MPI) for NumPy arrays."""
    h = host()
    if h.size == 1 or not any(_is_cupy(a) for a in arrays):
        return h
    if not all(_is_cupy(a) for a in arrays):
        raise DistributedError("a collective got both CuPy and NumPy arrays; move them to one device first")
    with _state.lock:
        if _state.nccl is None:
            _state.nccl = NCCLBackend(h)
        return _state.nccl


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _install_fault_handler():
    """An uncaught exception on one rank ends every rank at once (MPI_Abort),
    after saying which rank failed: the others would otherwise wait in their
    next collective until the timeout."""
    previous = _state.previous_excepthook = sys.excepthook

    def abort_job(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        h = _state.host
        print(f"avalon.distributed: rank {h.rank} of {h.size} failed with {exc_type.__name__}: {exc}; "
              "aborting the whole job", file=sys.stderr, flush=True)
        h.abort(1)

    sys.excepthook = abort_job


def _reset_for_tests(host_backend=None):
    """Forget the world (tests swap in fakes)."""
    if _state.previous_excepthook is not None:
        sys.excepthook = _state.previous_excepthook
        _state.previous_excepthook = None
    _state.host, _state.nccl = host_backend, None
