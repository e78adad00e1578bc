"""Write a program's man page (roff, to stdout) from its argparse parser, at package build
time (debian/rules):

    PYTHONPATH=. python3 debian/manpage.py MODULE SECTION [SEE_ALSO ...]

MODULE has build_parser(); the program is its prog, and the package of that name in
debian/control gives the one-line summary. Debian 12's argparse-manpage (1.2.2) writes
section 1 only, drops the epilog (the examples, the agent's exit codes) and lists the
top-level options after every subcommand; help2man reads the top-level --help only. So
this walks the parser itself: every command, nested ones too (`hosts list`), with its
usage and its own options; options the top level already has are described once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import VERSION

# argparse wraps usage to $COLUMNS - 2 columns, `usage: ` included: without it, and indented
# by 7 as man does, the usage blocks (not filled) fit in 80 columns.
os.environ["COLUMNS"] = "82"


def roff(text: str) -> str:
    """`text` as roff source: a backslash printed as such, - as a minus (a hyphen would
    break an option copied from the page), other characters than ASCII as groff escapes,
    and no line that starts like a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return re.sub(r"^(?=[.'])", r"\\&", text, flags=re.M)


def summary(program: str) -> str:
    """The package's one-line description in debian/control, for the NAME section."""
    control = (Path(__file__).parent / "control").read_text()
    match = re.search(rf"^Package: {re.escape(program)}\n(?:.+\n)*?Description: (.+)$", control, re.M)
    if not match:
        sys.exit(f"manpage.py: no package {program} in debian/control")
    return match[1]


def usage(parser: argparse.ArgumentParser) -> list[str]:
    """argparse's own usage, unfilled, without its `usage: ` prefix and indent."""
    text = re.sub(r"^usage: |^ {7}", "", parser.format_usage().rstrip(), flags=re.M)
    return [".nf", roff(text), ".fi"]


def invocation(action: argparse.Action) -> str:
    """An argument as --help writes it (`--ttl DURATION`, `--role {a,b}`, `id`), in bold
    and italics."""
    metavar = str(action.metavar or ("{" + ",".join(action.choices) + "}" if action.choices else ""))
    if not action.option_strings:
        return f"\\fI{roff(metavar or action.dest)}\\fR"
    value = "" if action.nargs == 0 else f" \\fI{roff(metavar or action.dest.upper())}\\fR"
    return ", ".join(f"\\fB{roff(option)}\\fR{value}" for option in action.option_strings)


def arguments(parser: argparse.ArgumentParser,
              described: set[tuple[tuple[str, ...], str | None]]) -> list[str]:
    """Each of the parser's arguments as a tagged paragraph, but for the subcommands and
    the options in `described` (option strings and help) already."""
    lines = []
    for action in parser._actions:
        if (isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS
                or (tuple(action.option_strings), action.help) in described):
            continue
        lines += [".TP", invocation(action)]
        if action.help:
            lines.append(roff(action.help % {**vars(action), "prog": parser.prog}))
    return lines


def commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command that does something (`hosts list`, not `hosts`), in --help's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from commands(sub)
                else:
                    yield sub


def epilog(text: str) -> list[str]:
    """The epilog's `heading:` blocks as sections; in each, a line indented by two starts
    a tagged paragraph (the tag up to a wide gap or a `#` comment, the rest its text) that
    more indented lines continue."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            lines.append(f".SH {roff(line.rstrip(':').upper())}")
        elif line.startswith("   "):
            lines.append(roff(line.strip()))
        else:
            tag, rest = (re.split(r"\s{2,}(?:#\s*)?", line.strip(), maxsplit=1) + [""])[:2]
            lines += [".TP", f"\\fB{roff(tag)}\\fR"] + ([roff(rest)] if rest else [])
    return lines


def page(parser: argparse.ArgumentParser, section: str, see_also: list[str]) -> str:
    program = parser.prog
    built = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
    top = {(tuple(a.option_strings), a.help) for a in parser._actions if a.option_strings}
    lines = [f'.TH {roff(program.upper())} {section} {time.strftime("%Y-%m-%d", built)} '
             f'"virtfleet {VERSION}" "virtfleet"',
             # Neither hyphenated nor justified: option names and commands stay whole.
             ".nh", ".ad l",
             ".SH NAME", f"{roff(program)} \\- {roff(summary(program))}",
             ".SH SYNOPSIS", *usage(parser),
             ".SH DESCRIPTION", roff(parser.description or ""),
             ".SH OPTIONS",
             "These go before the command; those a command's usage shows again may also follow "
             "its name.",
             *arguments(parser, set()),
             ".SH COMMANDS"]
    for command in commands(parser):
        lines += [f'.SS "{roff(command.prog.removeprefix(program + " "))}"', *usage(command), ".PP",
                  roff(command.description or ""), *arguments(command, top)]
    lines += epilog(parser.epilog or "")
    lines.append(".SH SEE ALSO")
    lines += [f".BR {roff(ref).replace('(', ' (')}," for ref in see_also]
    lines.append(roff(f"/usr/share/doc/{program}/README.md, the operator's manual"))
    return "\n".join(lines) + "\n"


def main() -> None:
    module, section, *see_also = sys.argv[1:]
    sys.stdout.write(page(importlib.import_module(module).build_parser(), section, see_also))


if __name__ == "__main__":
    main()
