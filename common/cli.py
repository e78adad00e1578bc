"""Small helpers both command lines use: durations, times and tables for people."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from common import wire

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '2d' -> seconds (for argparse `type=`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 15m, 1h or 2d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = (time.time() if now is None else now) - ts
    if delta < 0:
        return "in " + _span(-delta)
    return _span(delta) + " ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def printable(text: str) -> str:
    """`text` with whatever a terminal would act on shown escaped: hostnames and libvirt
    errors come from hosts, and an escape sequence in one could hide a row, forge another
    or write the operator's clipboard."""
    return wire.CONTROL_CHARS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


class Subcommands:
    """argparse subcommands whose own --help starts with what the command does (argparse
    shows a subcommand's `help` only in its parent's list)."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        kw.setdefault("description", kw.get("help"))
        return self.action.add_parser(name, **kw)  # type: ignore[no-any-return]


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer bash's completion and exit, when the completion script (argcomplete's, shipped
    in the .debs) runs the program: it sets _ARGCOMPLETE and reads the words from fd 8.
    Called before anything but building the parser, so completing has no side effects.
    Otherwise nothing, and argcomplete is not even imported (a plain run pays nothing)."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
