"""The documentation cannot drift from the code: every ``recon …`` command written in README.md and in the
notebooks' sources is accepted by the parser (parse only, nothing runs), and the README's method and task tables
are the registries' own (``recon methods --markdown``)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from recon.cli import build_parser
from recon.samplers.registry import markdown_table
from recon.tasks import markdown_table as task_table

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("[0-9][0-9]_*.py"))
SUBCOMMANDS = tuple(next(a for a in build_parser()._actions if a.dest == "command").choices)
_COMMAND = re.compile(r"(?:^|[\s`$(&;])recon\s+(" + "|".join(SUBCOMMANDS) + r")\b")


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced code block, fences paired in order."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _code_block_commands(text: str) -> list[str]:
    """``recon …`` commands inside shell code blocks (continuation lines joined, ``&&`` chains split; ``$VAR``
    stands for a number)."""
    commands = []
    for lang, body in _fenced_blocks(text):
        if lang not in ("", "bash", "sh", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = re.sub(r'"?\$\w+"?', "0", part.strip().removeprefix("$ "))
                if part.startswith("recon "):
                    commands.append(part)
    return commands


def _inline_commands(text: str) -> list[str]:
    """Complete-looking ``recon SUB --option …`` spans in inline code (a span with "…" is a sketch, skipped)."""
    return [span for span in re.findall(r"`(recon [^`]+)`", text)
            if _COMMAND.search(" " + span) and " -" in span and "…" not in span and "..." not in span]


def _notebook_commands(path: Path) -> list[str]:
    """Commands the notebooks show as comments (``# recon reconstruct …``) or in code blocks of their markdown."""
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r"^#\s+(recon\s+(?:" + "|".join(SUBCOMMANDS) + r")\b.*)$", line)
        if m:
            out.append(m.group(1))
    return out


def _documented() -> list[tuple[str, str]]:
    text = README.read_text()
    found = [("README.md", c) for c in _code_block_commands(text) + _inline_commands(text)]
    for nb in NOTEBOOKS:
        found += [(nb.name, c) for c in _notebook_commands(nb)]
    return found


def test_commands_are_found():
    found = _documented()
    assert len(found) >= 20
    assert any("dds3d" in c and "--checkpoint" in c for _, c in found)


@pytest.mark.parametrize(("where", "command"), _documented())
def test_every_documented_command_parses(where, command):
    argv = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:  # argparse's way of refusing
        pytest.fail(f"{where}: `{command}` is refused by the parser (exit {err.code})")


def test_readme_tables_are_the_registries():
    text = README.read_text()
    assert markdown_table() in text, "README's method table differs: paste `recon methods --markdown`"
    assert task_table() in text, "README's task table differs: paste `recon methods --markdown`"
