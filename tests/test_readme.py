"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_a_main_command_and_a_test_command():
    main, tests = readme_commands()[:2]
    assert main.endswith("python -m studies.reproduce --mode full")
    assert tests.endswith("python -m pytest")
    for command in (main, tests):
        assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in command


def test_ci_runs_the_readme_test_command_verbatim():
    tests = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
