"""Command-line entry point: `dropless <command>`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dropless", description="Dropless MoE on PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("example", help="run one MoE layer on random tokens and print what it did")
    args = parser.parse_args(argv)
    if args.command == "example":
        from dropless.example import run_example
        run_example()
    return 0


if __name__ == "__main__":
    sys.exit(main())
