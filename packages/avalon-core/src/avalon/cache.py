"""The kernel cache on the command line (runtime.kernel_cache):

    python -m avalon.cache                  # where it is, its files, their size, the limit
    python -m avalon.cache --prune [SIZE]   # least recently used files out, down to SIZE or the limit
    python -m avalon.cache --clear          # every file out

A module of its own, which nothing imports: `python -m` on a module that
importing avalon already loaded would run a second copy of it.
"""
import sys

from avalon.runtime.kernel_cache import main

if __name__ == "__main__":
    sys.exit(main())
