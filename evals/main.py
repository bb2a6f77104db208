"""`interventions` console script: `demo`, `eval`, `tune`, `show`, `score`, `calibrate`, `lm-eval`, `methods`, `families`,
`describe`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 0 on success, 2 on a usage or validation error, 1 on a runtime failure, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # lm-eval's own parser takes every argument after it
        from evals.lm_eval_cli import main as lm_eval_main

        return lm_eval_main(argv[1:])
    parser = argparse.ArgumentParser(prog="interventions", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="wrap SmolLM2-135M-Instruct with ACT and compare generations")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--beta", type=float, default=0.4)
    demo.add_argument("--threshold", type=float, default=0.1)
    sub.add_parser("lm-eval", help="lm-eval's own CLI with the `interventions` model type (--model interventions "
                   "--model_args pretrained=...,methods=...,params=...)", add_help=False)
    sub.add_parser("methods", help="list the methods")
    sub.add_parser("families", help="list the supported model types")
    describe = sub.add_parser("describe", help="parameters of a method, with defaults and sources")
    describe.add_argument("method")
    from evals.cli import add_eval_commands
    from evals.score import add_score_commands
    from evals.show import add_show_command
    from evals.tune import add_tune_command

    add_eval_commands(sub)
    add_tune_command(sub)
    add_show_command(sub)
    add_score_commands(sub)
    calibrate = sub.add_parser("calibrate", help="produce method presets from a model")
    targets = calibrate.add_subparsers(dest="target", required=True)
    from .calibrate import act_heads, perturb_heads, sink_dims

    sink = targets.add_parser("sink-dims", help="find VAR's massive-activation dims; write a sink_dims JSON")
    sink_dims.add_arguments(sink)
    sink.set_defaults(run=sink_dims.main)
    heads = targets.add_parser("act-heads", help="search ACT's heads one at a time on a dev set; write a heads JSON")
    act_heads.add_arguments(heads)
    heads.set_defaults(run=act_heads.main)
    perturb = targets.add_parser("perturb-heads", help="greedy top-k head search for pag's perturbed branch on a dev "
                                 "set; write a heads JSON")
    perturb_heads.add_arguments(perturb)
    perturb.set_defaults(run=perturb_heads.main)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, the shell's exit code for SIGINT
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except ValueError as e:
        _error(e, args.verbose)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI turns any failure into one line + exit 1
        _error(e, args.verbose)
        return 1


def _run(args: argparse.Namespace) -> int:
    import interventions as iv

    if args.command == "demo":
        from .demo import run_demo

        run_demo(max_new_tokens=args.max_new_tokens, beta=args.beta, threshold=args.threshold)
    elif args.command == "methods":
        print("\n".join(iv.methods()))
    elif args.command == "families":
        print("\n".join(iv.families()))
    elif args.command == "eval":
        from evals.cli import run_eval

        return run_eval(args)
    elif args.command in ("score", "calibrate", "tune", "show"):
        return args.run(args)
    elif args.command == "describe":
        print(iv.describe(args.method))
    return 0


def _error(e: Exception, verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
