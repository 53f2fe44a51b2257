"""The README and docs/ cannot drift from the code: every command they show must exist.

Commands are read from ``sh`` code blocks and from inline code (`make bench`). A `make` target
must be a rule of the Makefile; `python -m MODULE` must be one of our programs, and each flag
given to it must be in its --help; every `MQTT_*` variable must be the fallback of a flag.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

from tests.support import Spawner

REPO = Path(__file__).resolve().parent.parent
DOCS = [Path("README.md"), *sorted(p.relative_to(REPO) for p in (REPO / "docs").glob("*.md"))]
PROGRAMS = ("broker", "ping_client", "echo_client")
# Modules the docs may run that are not one of the three programs (`make` runs these too).
OTHER_MODULES = (
    "broker.users",
    "bench.run",
    "bench.soak",
    "bench.cluster",
    "bench.fleet",
    "bench.websocket",
    "bench.ws_codecs",
    "cluster",
)
# Tools whose flags the docs show, checked against their --help like the programs'.
TOOLS = ("ping_client.report",)


def commands(text: str) -> list[str]:
    """Every shell command a document shows: lines of sh blocks, and inline code spans."""
    found = []
    for block in re.findall(r"(?ms)^```(?:sh|bash)\n(.*?)^```", text):
        found += [line.split(" #")[0].strip() for line in block.splitlines()]
    found += re.findall(r"`((?:make|\.venv/bin/python|python) [^`]+)`", text)
    return [command for command in found if command]


def words(command: str) -> list[str]:
    """The command's words, after any leading VAR=value assignments."""
    try:
        parts = shlex.split(command.replace("…", "x"))
    except ValueError:  # a line continued with a backslash: plain words will do
        parts = command.split()
    while parts and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", parts[0]):
        parts.pop(0)
    return parts


def make_targets() -> set[str]:
    """The rules the Makefile defines."""
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"(?m)^([a-z][a-z0-9-]*):", text))


@functools.cache
def help_text(module: str) -> str:
    """``python -m module --help``, once per module and test run (it writes no file)."""
    result = Spawner(REPO).run(module, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_every_command_shown_exists(doc: Path) -> None:
    targets = make_targets()
    checked = 0
    shown = commands((REPO / doc).read_text())
    for command in (part for line in shown for part in re.split(r"\|\||&&|[|;]", line)):
        parts = words(command)
        if not parts:
            continue
        if parts[0] == "make":
            for target in (p for p in parts[1:] if "=" not in p and not p.startswith("-")):
                assert target in targets, f"{doc}: `{command}`: no make target {target!r}"
            checked += 1
        elif "-m" in parts and parts[0].endswith("python"):
            module = parts[parts.index("-m") + 1]
            assert module in PROGRAMS + OTHER_MODULES + TOOLS, f"{doc}: `{command}`: no {module}"
            if module in PROGRAMS + TOOLS:
                usage = help_text(module)
                for flag in (p.split("=")[0] for p in parts if p.startswith("--")):
                    assert flag in usage, f"{doc}: `{command}`: {module} has no {flag}"
            checked += 1
    if doc == Path("README.md"):
        assert checked >= 5  # the quick start and the probe: a parser that finds none is broken


def test_every_environment_variable_named_is_a_flag() -> None:
    flags = "\n".join(help_text(module) for module in PROGRAMS)
    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"\bMQTT_([A-Z][A-Z0-9_]*)\b", (REPO / doc).read_text()))
    assert named, "no MQTT_* variable found: the pattern is broken"
    named.discard("SOME_FLAG")  # the docs' own placeholder: `--some-flag` is `MQTT_SOME_FLAG`
    for name in sorted(named):
        flag = "--" + name.lower().replace("_", "-")
        assert flag in flags, f"MQTT_{name} is documented, but no program has {flag}"


def test_the_readme_is_the_five_minute_part() -> None:
    """At most 200 lines: the rest belongs in docs/."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_the_settings_heading_counts_its_table() -> None:
    """'The six settings you will want first' lists six (it once said five and listed six)."""
    text = (REPO / "README.md").read_text()
    heading = re.search(r"^## The (\w+) settings you will want first$", text, re.M)
    assert heading is not None
    section = text[heading.end() :].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `MQTT_\w+` \|", section, re.M)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert words.index(heading.group(1)) == len(rows)


def test_commands_shown_from_the_venv_name_it() -> None:
    """supervisord and supervisorctl are installed in .venv/bin, not on PATH."""
    text = (REPO / "README.md").read_text()
    assert not re.search(r"(?<![/\w])supervisor(d|ctl) -c", text)
