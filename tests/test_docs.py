"""The README's two set-up commands are the ones users and CI run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("pip install")]


def test_readme_has_exactly_two_setup_commands():
    assert readme_commands() == ["pip install -e . && gptjax train",
                                 "pip install -e '.[test]' && pytest -q -n 2 --dist loadfile"]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_relative_links_in_the_readme_and_docs_resolve():
    """README.md is a page that points into docs/; a moved or renamed file breaks a link."""
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, "\n".join(broken)


def test_the_readme_stays_a_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
