"""The argument parser of ``cervl``: one sub-command per pipeline stage (see :mod:`cervl.cli`).

Each command family's arguments live beside its code (``cli/data.py``, ``train.py``, ``predict.py``,
``explain.py``, ``serve.py``); shared option groups are in ``cli/options.py``."""

from __future__ import annotations

import argparse
import re

from cervl import __version__
from cervl.cli import data as cli_data
from cervl.cli import explain as cli_explain
from cervl.cli import predict as cli_predict
from cervl.cli import serve as cli_serve
from cervl.cli import train as cli_train
from cervl.core.registry import suggest


class SuggestingParser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped sub-command, choice or option, as config keys have."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += suggest(choice.group(1), re.findall(r"'?([\w-]+)'?", choice.group(2))).replace(";", ",", 1)
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            message += suggest(unknown.group(1).split("=")[0], self.option_names()).replace(";", ",", 1)
        super().error(message)

    def option_names(self) -> list[str]:
        """Every option string of this parser and of the sub-command chosen on the command line."""
        names = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and self.chosen in action.choices:
                names += list(action.choices[self.chosen]._option_string_actions)
        return names

    chosen: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="cervl", description="Compound Expression Recognition with large "
                              "Vision-Language models")
    parser.add_argument("--version", action="version", version=f"cervl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SuggestingParser)
    add = sub.add_parser
    # one function per command family, each beside its commands' code
    for family in (cli_data, cli_train, cli_predict, cli_explain, cli_serve):
        family.add_parsers(add)
    return parser
