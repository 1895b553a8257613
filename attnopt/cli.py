"""The `attnopt` command line."""

from __future__ import annotations

import argparse
import sys

from attnopt import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt", description="Find, rewrite and verify "
                                     "the attention in PyTorch models.")
    parser.add_argument("--version", action="version", version=f"attnopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="optimize a small transformer with each policy")
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from attnopt.demo import run_demo
        run_demo(seq_len=args.seq_len, batch=args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
