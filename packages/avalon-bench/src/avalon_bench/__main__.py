"""Entry point for ``python -m avalon_bench``.

The side-by-side benchmark against PyTorch is not built yet; until it is,
this runs the short training demo in ``avalon.demo`` instead.
"""

import argparse
import runpy
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m avalon_bench",
        description="Benchmark Avalon against PyTorch.",
    )
    parser.add_argument(
        "--which",
        choices=("all", "cnn", "vae"),
        default="all",
        help="which benchmark to run (default: all)",
    )
    args, rest = parser.parse_known_args(argv)
    print(
        f"avalon_bench: the side-by-side benchmark against PyTorch is not built yet "
        f"(--which {args.which}); running the avalon.demo training demo instead.",
        flush=True,
    )
    # Arguments this entry point does not know are handed on to the demo.
    sys.argv = ["avalon.demo", *rest]
    runpy.run_module("avalon.demo", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
