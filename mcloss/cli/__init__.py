"""The ``mcloss`` command: one module per subcommand, each with ``build_parser()`` and ``main(argv) -> int``.

This package is the only place that parses arguments or prints; the library below it returns values.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "COMMANDS"]

#: subcommand → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mcloss.cli.synth", "write a synthetic fine-grained parts dataset in CUB layout"),
    "train": ("mcloss.cli.train", "train an MC-Loss (or CE) model"),
    "eval": ("mcloss.cli.eval", "top-1/top-5 of both heads on a test split"),
    "domain": ("mcloss.cli.domain", "fit a checkpoint's domain check (an out-of-domain warning) and measure it"),
    "export": ("mcloss.cli.export", "batch-export channel maps and Grad-CAM for images"),
    "parts": ("mcloss.cli.parts", "part-localization and faithfulness metrics"),
    "atlas": ("mcloss.cli.atlas", "each channel's top patches across a dataset, with part, purity and consistency"),
    "sanity": ("mcloss.cli.sanity", "randomization, group-knockout and random-logit sanity checks"),
    "bench": ("mcloss.cli.bench", "throughput benchmark of the explainability paths"),
    "import": ("mcloss.cli.import_", "import a checkpoint of the official code, FGVCLib, Kurumi233 or torchvision"),
}


def _usage() -> str:
    lines = ["usage: mcloss [--debug] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run 'mcloss COMMAND --help' for a command's options. --debug (or MCLOSS_DEBUG=1) shows the traceback of",
        "an error. Exit codes: 0 done, 2 bad arguments or unusable inputs, 1 an unexpected error (export: also",
        "some inputs rejected), 130 interrupted.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = bool(args) and args[0] == "--debug"
    if debug:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from mcloss.core.version import __version__

        print(f"mcloss {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"mcloss: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from mcloss.cli._common import crash, debug_mode, debugging

    with debug_mode(debug):
        try:
            module = importlib.import_module(COMMANDS[command][0])
            from mcloss.core.device import keep_tensors_in_heap  # here: 'mcloss --help' imports no torch

            keep_tensors_in_heap()  # batch forwards on a CPU, 1.4× faster in a fresh process
            return int(module.main(rest) or 0)
        except SystemExit as exc:  # argparse has printed the reason (or --help)
            return exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # the command's own run() reports its errors; this is for the rest
            return crash(command, exc, debugging())


if __name__ == "__main__":
    raise SystemExit(main())
