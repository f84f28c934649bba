"""The ``cervl`` command line: one sub-command per pipeline stage; argument parsing and printing only.

Every sub-command calls one library function. A :class:`~cervl.core.errors.UserError` (bad config, data
or input file) and an operating-system error (missing permission, full disk, port in use) print as
one ``error:`` line with exit status 2; anything else is a bug and keeps its traceback.

Imports: anything: it parses arguments, calls one library function per command and prints."""

from __future__ import annotations

import logging
import sys

from cervl.cli.interrupt import kept_after_interrupt
from cervl.cli import data as cli_data
from cervl.cli import explain as cli_explain
from cervl.cli import predict as cli_predict
from cervl.cli import serve as cli_serve
from cervl.cli import train as cli_train
from cervl.cli.parser import build_parser
from cervl.core.errors import UserError

log = logging.getLogger("cervl")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


COMMANDS = {**cli_data.COMMANDS, **cli_train.COMMANDS, **cli_predict.COMMANDS,
            **cli_explain.COMMANDS, **cli_serve.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (argparse stops filling a nargs="*" positional there)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.chosen = args.command  # "did you mean" looks among this sub-command's options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was kept and how to go on, not a traceback
        print(f"\ninterrupted: {kept_after_interrupt(args)}", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission, full disk, a folder where a file was expected, a port in use
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
