"""The ``deltatune`` command: ``train``, ``ab``, ``merge``, ``inspect`` and ``serve``.

Errors in what the user gave (a missing folder, a bad data file, an unknown method) are printed as one
line starting with ``deltatune: error:`` and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .options import UsageError, add_run_arguments, given_options, resolve
from .serve import add_serve_arguments


class _RefuseSingular(argparse.Action):
    """``ab --method``/``--seed``: an argparse error (exit 2) pointing at the plural flag, not ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"ab compares several runs: use {option_string}s, not {option_string}")


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning, peft-compatible.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with an adapter and write a run folder",
                           description="With no arguments: LoRA on the embedded MiniLM-L6 encoder and the bundled "
                                       "support-intents dataset, next to a head-only baseline.")
    add_run_arguments(train)
    train.add_argument("--no-baseline", dest="baseline", action="store_const", const=False,
                       help="skip the head-only baseline run")

    ab = sub.add_parser("ab", help="A/B test: head-only baseline vs each method over several seeds")
    add_run_arguments(ab, single_run=False)  # ab takes --methods/--seeds, not --method/--seed
    ab.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    ab.add_argument("--methods", nargs="+", help="methods to compare (default: lora dora)")
    for singular in ("--method", "--seed"):  # exact names, else argparse would take them as --methods/--seeds
        ab.add_argument(singular, nargs="+", action=_RefuseSingular, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    merge = sub.add_parser("merge", help="merge an adapter into its base and save a plain transformers model")
    merge.add_argument("adapter", help="a run folder or an adapter folder")
    merge.add_argument("--output", required=True, help="folder for the merged model")
    merge.add_argument("--model", help="base model folder (default: the one recorded in the adapter)")

    inspect = sub.add_parser("inspect", help="describe an adapter folder")
    inspect.add_argument("adapter", help="a run folder or an adapter folder")

    serve = sub.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API")
    add_serve_arguments(serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command in ("train", "ab"):
            options = resolve(args, given_options(args))
            if args.command == "ab" and options.task == "image-cls":
                raise UsageError("deltatune ab does not compare image-cls runs yet; deltatune train --task "
                                 "image-cls reports the linear probe next to the adapter")
            if args.command == "train" and options.task == "image-cls":
                from .vision import image_command

                image_command(options)
            elif args.command == "train":
                from .train import train_command

                train_command(options)
            else:
                from .ab import ab_command

                ab_command(options)
        elif args.command == "serve":
            from .serve import serve_command

            serve_command(args)
        elif args.command == "merge":
            from .merge import merge_command

            merge_command(args.adapter, args.output, args.model)
        else:
            from .inspect_adapter import inspect_command

            print(inspect_command(args.adapter))
    except (UsageError, FileNotFoundError) as exc:
        print(f"deltatune: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # library errors (bad checkpoint, config) are user-facing too
        from ..checkpoint import CheckpointError
        from ..config import ConfigError
        from ..targeting import TargetError

        if isinstance(exc, (CheckpointError, ConfigError, TargetError)):
            print(f"deltatune: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise
    return 0
