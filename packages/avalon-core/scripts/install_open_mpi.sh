#!/bin/sh
# Installs Open MPI (mpirun and the library mpi4py loads) for avalon.distributed.
#
# - Nothing to do (exit 0) when mpirun is already on PATH.
# - As root with apt-get: `apt-get update` then
#   `apt-get install -y openmpi-bin libopenmpi-dev` (Debian/Ubuntu).
# - Otherwise, or if apt-get fails: prints how to install it and exits 0, so the
#   test session never fails because of it (the multi-process tests then skip,
#   saying why).
set -u

if command -v mpirun >/dev/null 2>&1; then
    echo "Open MPI is already installed ($(command -v mpirun)); nothing to do."
    exit 0
fi

instructions() {
    cat <<MSG
Open MPI is not installed, and this script could not install it ($1).
avalon.distributed needs it for more than one process:
  - on Debian/Ubuntu: sudo apt-get install openmpi-bin libopenmpi-dev
  - on a cluster: load its MPI module
then python -m pip install mpi4py.
MSG
}

if [ "$(id -u 2>/dev/null)" != "0" ]; then
    instructions "not running as root"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    instructions "apt-get is not available"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev; then
    exit 0
fi
instructions "apt-get failed"
exit 0
