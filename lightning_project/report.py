"""`python -m lightning_project.report SWEEP_DIR [--top N]`: the report of a sweep (Hydra multirun).

Writes sweep_summary.csv (every run, best first) and sweep.png (the metric against each swept
parameter, the learning curves of the best runs) into SWEEP_DIR, and prints the best runs and the
command that repeats the best one. A plain command: it reads run directories, no config to compose.
"""

from __future__ import annotations

import argparse

from lightning_project.errors import UserError
from lightning_project.reporting import show, write_report
from lightning_project.utils import runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_project.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the folder of a multirun (logs/train/multiruns/<time>)")
    parser.add_argument("--top", type=int, default=5, help="how many of the best runs to print (default 5)")
    args = parser.parse_args(argv)
    with runtime.user_errors():
        if args.top < 1:
            raise UserError(f"--top={args.top}: give how many of the best runs to print (>= 1)")
        show(write_report(args.sweep_dir), runtime.console(), args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
