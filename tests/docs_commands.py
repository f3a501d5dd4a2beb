"""The shell commands and Python snippets of the docs, so tests run them exactly as written
(issue 8).

    from tests.docs_commands import bash_blocks, block_under, fill, private_network

    block = block_under(ROOT / "README.md", "Model registry")   # the one ```bash block there
    for cmd in block.commands:                                  # continuation lines joined
        text = fill(cmd.text, run_id=run_id)                    # only <placeholders> change
        subprocess.run([*private_network_prefix, "bash", "-c", text], check=True)

A block is a fenced code block whose info string is ``bash``; other fences (``text``,
``json``, none) are not commands. A command is a line plus the lines its trailing ``\\`` or
``|`` continues; full-line comments and blank lines are left out, trailing comments stay (bash
ignores them). :func:`python_blocks` reads the ``python`` blocks, each as one command: the
whole snippet, a program run as written. :func:`private_network` gives commands their own
loopback, so a documented fixed port (``-p 5000``) can't collide with anything else on the
machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^(```+|~~~+)\s*(\S*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_PLACEHOLDER = re.compile(r"<([a-z_]+)>")


@dataclass(frozen=True)
class Command:
    text: str  # as written (continuation lines keep their backslash-newline)
    line: int  # 1-based line of its first line in the file

    @property
    def placeholders(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.text))


@dataclass(frozen=True)
class Block:
    path: Path
    heading: str  # the nearest heading above the block, without the #s
    line: int  # 1-based line of the opening fence
    commands: tuple[Command, ...]


def bash_blocks(path: str | os.PathLike) -> list[Block]:
    """Every fenced ``bash`` block of a markdown file, in order, with its heading."""
    return [Block(Path(path), heading, start, tuple(_commands(body, start + 1)))
            for heading, start, body in _fenced(path, "bash")]


def python_blocks(path: str | os.PathLike) -> list[Block]:
    """Every fenced ``python`` block of a markdown file, in order; its one command is the
    whole snippet (comment lines included)."""
    return [Block(Path(path), heading, start, (Command("\n".join(body), start + 1),))
            for heading, start, body in _fenced(path, "python")]


def _fenced(path: str | os.PathLike, language: str) -> list[tuple[str, int, list[str]]]:
    """(heading, line of the opening fence, body lines) of each ``language`` block."""
    path = Path(path)
    blocks, heading, fence, body, start = [], "", None, [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            m = _FENCE.match(line)
            if m:
                fence, lang, body, start = m.group(1), m.group(2), [], n
                fence_lang = lang
            elif h := _HEADING.match(line):
                heading = h.group(2)
        elif line.startswith(fence):
            if fence_lang == language:
                blocks.append((heading, start, body))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise ValueError(f"{path}:{start}: code fence never closed")
    return blocks


def block_under(path: str | os.PathLike, heading: str) -> Block:
    """The single ``bash`` block under ``heading`` (fails loudly if there are none or several)."""
    found = [b for b in bash_blocks(path) if b.heading == heading]
    if len(found) != 1:
        raise LookupError(f"{path}: expected one ```bash block under '{heading}', "
                          f"found {len(found)}")
    return found[0]


def _commands(lines: list[str], first_line: int):
    text, start = [], 0
    for n, line in enumerate(lines, first_line):
        if not text:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = n
        text.append(line)
        code = line.split(" #", 1)[0].rstrip()  # a trailing comment ends the line's code
        if not (code.endswith("\\") or code.endswith("|")):
            yield Command("\n".join(text), start)
            text = []
    if text:
        raise ValueError(f"line {start}: command continues past the end of its block")


def fill(text: str, **values: str) -> str:
    """Replace ``<name>`` placeholders, and only those; every placeholder must get a value."""
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise KeyError(f"no value for placeholders {sorted(missing)} in: {text}")
    return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), text)


@contextmanager
def private_network():
    """A command prefix that runs in a fresh network namespace with its own loopback.

    Yields ``["ip", "netns", "exec", NAME]``, or ``[]`` where namespaces aren't available
    (not root, no ``ip``): commands then share the machine's ports.
    """
    if os.geteuid() != 0 or not shutil.which("ip"):
        yield []
        return
    name = f"fowlflow-docs-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
