"""The `megarl` command.

Each subcommand lives with the part it drives; the module named here defines
`add_arguments(parser)` and `run(args) -> int`, and is imported only when its subcommand runs
(so `megarl --help` is fast and needs nothing beyond the standard library).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megarl.trainer.cli", "run RL training (under torchrun/srun: every rank runs it)"),
    "demo": ("megarl.trainer.demo", "the CPU demo: tiny model, dev server, GRPO + SIREN on 2 ranks"),
    "eval": ("megarl.eval.cli", "avg@n, pass@k and maj@k of a checkpoint on benchmark files"),
    "report": ("megarl.eval.report", "plots of reward, entropy and intervention metrics of runs"),
    "verify-conversion": ("megarl.checkpoint.verify",
                          "compare a Megatron checkpoint's logits with its Hugging Face source"),
    "plan": ("megarl.parallel.planner", "per-GPU memory and a parallel layout for a model"),
}


def build_parser(load: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; subcommands named in `load` get their full arguments (imports their module)."""
    parser = argparse.ArgumentParser(
        prog="megarl", description="Megatron-core RL post-training with entropy control."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if load is not None and name in load:
            importlib.import_module(module_name).add_arguments(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=[command] if command in COMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
