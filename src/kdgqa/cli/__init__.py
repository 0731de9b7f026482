"""``kdgqa`` command line: a thin argparse front over the library, one module per subcommand.

Subcommands are modules listed in :data:`COMMANDS`; each defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Adding one (e.g. ``experiment``) means
adding its module and one entry here. Building the parser imports no torch, timm or
transformers (``--help`` answers at once); each ``run`` imports what its command needs.
Errors print one line ``kdgqa: error: ...`` on stderr and exit with status 2; Ctrl-C prints
``kdgqa: interrupted`` and exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]

from kdgqa.cli import convert, experiment, fidelity, report, schemes

COMMANDS = (convert, experiment, fidelity, report, schemes)


class CommandError(Exception):
    """A usage or input error to report in one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandError(message)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = _Parser(prog="kdgqa", description="Key-driven grouped-query attention tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMANDS:
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


#: Longest error message printed; a message is cut there (values quoted in it can be long).
MAX_MESSAGE = 600


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 success, 2 bad input, 130 interrupted)."""
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        status: int = args._run(args)
        return status
    except (CommandError, ValueError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + f"... (cut at {MAX_MESSAGE} characters)"
        print(f"kdgqa: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Files are written whole or not at all, so an interruption leaves a resumable study.
        hint = "; finished runs are kept, continue with --resume" if command == "experiment" else ""
        print(f"kdgqa: interrupted{hint}", file=sys.stderr)
        return 130

