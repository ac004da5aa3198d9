"""The README stays true: two set-up commands, the second is what CI runs, every subcommand exists."""

import re
from pathlib import Path

from grok1.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_setup_is_two_commands_and_ci_runs_the_test_command():
    install, test = _setup_commands()
    assert "pip install torch==2.13.0" in install and "grok1 generate" in install
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), f"{test!r} is not a line of .ci/run"


def test_readme_subcommands_exist():
    commands = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    used = set(re.findall(r"^grok1 (\w+)", (ROOT / "README.md").read_text(), re.M))
    assert used and used <= commands, used - commands
