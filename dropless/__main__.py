"""`python -m dropless` and the `dropless` console script (pyproject.toml)."""

import sys


def run() -> int:
    """`dropless.cli.main`, a Ctrl-C while it loads included: importing torch takes seconds (a
    torchrun worker is stopped then as often as later), and that is an exit, not a traceback."""
    try:
        from dropless.cli import main
        return main()
    except KeyboardInterrupt:
        print("dropless: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
