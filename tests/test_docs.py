"""The documents a newcomer reads first stay true: the contract's copy, the README's size and
its two set-up commands, and CI running the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT.parent / "shared" / "spec" / "api.md"


def readme_commands() -> list[str]:
    first_block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert first_block is not None, "the README opens with a shell block"
    lines = first_block.group(1).splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.skipif(not CONTRACT.exists(), reason="no shared/ beside this checkout")
def test_the_contract_in_docs_is_the_shared_one() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == CONTRACT.read_text()


def test_the_readme_fits_on_a_page_and_names_two_setup_commands() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 8 * 1024 + 512
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert "sandboxd serve" in commands[0]


def test_ci_runs_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], (test_command, ci)


def test_docs_link_only_to_files_that_exist() -> None:
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_the_lifecycle_in_the_architecture_is_the_code_s() -> None:
    """The state table is the one of daemon/lifecycle/states.py, and the teardown's steps are
    those of daemon/lifecycle/teardown.py, in its order."""
    from daemon.lifecycle import teardown
    from daemon.lifecycle.states import table_markdown

    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = re.search(r"checks it -->\n\n(.*?)\n<!-- end of the state table -->", doc, re.S)
    assert table is not None, "docs/architecture.md has the generated state table"
    assert table.group(1) == table_markdown(), "regenerate: python3 -m daemon.lifecycle.states"
    assert teardown.__doc__ is not None
    in_code = re.findall(r"^ {4}\d\. (\w+)", teardown.__doc__, re.M)
    in_doc = re.findall(r"^\d\. \*\*(\w+)\*\*", doc.split("## The lifecycle")[1], re.M)
    assert in_code == in_doc == [
        "mark", "kill", "unpublish", "unplug", "end", "remove", "release",
    ]  # fmt: skip
