"""The docs stay true: the state diagram is the table's, the README's commands are the CI's."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from contracts.machine import mermaid_diagram
from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_doc_shows_the_generated_state_diagram() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert f"```mermaid\n{mermaid_diagram()}```" in doc


def test_state_diagram_command_prints_the_table() -> None:
    result = CliRunner().invoke(main, ["state-diagram"])
    assert result.exit_code == 0
    assert result.output == mermaid_diagram()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().split("```")[1].splitlines()  # the first block
    test_command = next(line for line in readme if "pytest" in line)
    install, run = test_command.split(" && ")[-2:]
    assert install == "pip install -c constraints.txt -e '.[dev]'"  # the pinned versions
    assert run.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci and run in ci
