"""Entry point for ``python -m avalon_bench`` (see avalon_bench.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
