"""The `attnopt` command line.

    attnopt demo                      optimize a small transformer with each policy
    attnopt inspect DIR [--json]      the attention sites of a local Hugging Face model
    attnopt convert SRC -o OUT        optimize and write OUT: .onnx (checked in onnxruntime)
                                      or .pt2 (an ExportedProgram; load after `import attnopt`)
    attnopt bench SRC                 latency of original vs optimized, PyTorch and onnxruntime

Exit codes: 0 ok, 1 verification failed, 2 bad input. Errors are one line; `--debug` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from attnopt import __version__

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt", description="Find, rewrite and verify "
                                     "the attention in PyTorch models.")
    parser.add_argument("--version", action="version", version=f"attnopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="optimize a small transformer with each policy")
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--batch", type=int, default=2)
    inspect = commands.add_parser("inspect", help="list the attention sites of a model")
    inspect.add_argument("source", help="a local Hugging Face model directory")
    inspect.add_argument("--seq-len", type=int, default=16)
    inspect.add_argument("--batch", type=int, default=1)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    convert = commands.add_parser("convert", help="optimize a checkpoint and write ONNX or .pt2")
    convert.add_argument("source", help="a local Hugging Face model directory or a .pt2 file")
    convert.add_argument("-o", "--output", required=True, help="OUT.onnx or OUT.pt2")
    policy = convert.add_mutually_exclusive_group()
    policy.add_argument("--policy", default="exact",
                        help="a preset name: exact, none, long, fast, memory, accurate, "
                        "compact, edge (default: exact)")
    policy.add_argument("--policy-file", help="a policy as JSON")
    convert.add_argument("--seq-len", type=int, default=16)
    convert.add_argument("--batch", type=int, default=1)
    convert.add_argument("--opset", type=int, default=None)
    convert.add_argument("--target", default="onnx", choices=["onnx", "ort"],
                         help="onnx: standard ops; ort: onnxruntime's fused contrib ops")
    convert.add_argument("--report", help="write the optimization report (JSON) here")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    bench = commands.add_parser("bench", help="latency of the original vs optimized model")
    bench.add_argument("source", help="a local Hugging Face model directory or a .pt2 file")
    bench.add_argument("--policy", default="exact")
    bench.add_argument("--seq-len", type=int, default=128)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--runs", type=int, default=10)
    bench.add_argument("--no-onnx", action="store_true", help="PyTorch only")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except Exception as error:  # noqa: BLE001 - one readable line unless --debug
        from attnopt.errors import AttnoptError, VerificationError
        if args.debug:
            raise
        line = str(error).splitlines()[0] if str(error) else type(error).__name__
        hint = "" if isinstance(error, AttnoptError) else " (--debug shows the traceback)"
        print(f"attnopt: error: {line}{hint}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED if isinstance(error, VerificationError) \
            else EXIT_BAD_INPUT


def _progress_printer():
    """Steps on stderr as they start, each with the time since the command began."""
    import time
    started = time.perf_counter()

    def show(step: str) -> None:
        print(f"[attnopt {time.perf_counter() - started:6.1f} s] {step}…", file=sys.stderr,
              flush=True)
    return show


def _run(args) -> int:
    if args.command == "demo":
        from attnopt.demo import run_demo
        run_demo(seq_len=args.seq_len, batch=args.batch)
        return EXIT_OK
    if args.command == "inspect":
        from attnopt.api import optimize
        from attnopt.checkpoints import example_inputs, load_hf_model
        model = load_hf_model(args.source)
        inputs = example_inputs(model, batch=args.batch, seq_len=args.seq_len)
        report = optimize(model, "none", example_kwargs=inputs, verify=False).report
        print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
        return EXIT_OK
    if args.command == "convert":
        from attnopt.convert import convert
        print(convert(args.source, args.output, policy=args.policy,
                      policy_file=args.policy_file, seq_len=args.seq_len, batch=args.batch,
                      opset=args.opset, target=args.target, report_path=args.report,
                      force=args.force, progress=_progress_printer()))
        return EXIT_OK
    if args.command == "bench":
        from attnopt.convert import bench
        print(bench(args.source, policy=args.policy, seq_len=args.seq_len, batch=args.batch,
                    runs=args.runs, onnx=not args.no_onnx))
        return EXIT_OK
    raise ValueError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
