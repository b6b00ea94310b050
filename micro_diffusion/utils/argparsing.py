"""What every command-line parser of the project shares: help that shows defaults, and renamed flags."""
from __future__ import annotations

import argparse
from typing import Any, NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that appends each option's default (unless its text already states one), and keeps descriptions as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line on stderr, `PROG: error: message (PROG --help lists ...)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Report a bad command line in one line (no usage block) and exit 2, the project's usage-error code."""
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def parser(prog: str | None = None, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser with the project's help formatter and one-line usage errors (subcommands inherit both)."""
    return ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)


def subparser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the project's help formatter (help= also becomes its description)."""
    kwargs.setdefault("description", kwargs.get("help"))
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


class _Renamed(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="*", help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} was renamed: use {self.new}")


def renamed(p: argparse.ArgumentParser, old: str, new: str) -> None:
    """Make an old flag fail with a usage error (exit 2) that names its new spelling."""
    p.add_argument(old, action=_Renamed, new=new)
