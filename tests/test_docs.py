"""The documents stay honest: the README stays short, every link and every script they name exists."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = [README, REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024  # bytes: a newcomer's page; the details live in docs/
FIGURE_LIMIT = 200 * 1024  # bytes per image the README shows
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# scripts as the documents run them: python X.py, python -m benchmarks.X, bash X.sh
SCRIPT = re.compile(r"\b(?:python3? (?:-m (benchmarks\.\w+)|([\w/]+\.py))|bash ([\w/]+\.sh))")
# words about how the repository was made, not about what it does
PROCESS_WORDS = re.compile(r"this\s+session|spec\s+study|minute\s+budget|shared/spec[s]", re.IGNORECASE)
SKIPPED_FOLDERS = {".git", "__pycache__", "hw2_data", "outputs", "checkpoints", "report"}


def slug(heading):
    """GitHub's anchor of a markdown heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # no headings inside code
    return {slug(match) for match in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def relative_links(path):
    """(target file, anchor or None) of every link that is not a web address."""
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        yield (path.parent / file_part if file_part else path), anchor or None


def test_readme_is_a_short_page():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move details to docs/"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(document):
    broken = []
    for target, anchor in relative_links(document):
        if not target.exists():
            broken.append(f"{target.relative_to(REPO) if target.is_relative_to(REPO) else target} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{target.relative_to(REPO)}#{anchor} (no such heading)")
    assert not broken, f"{document.name} links to: {', '.join(broken)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_script_a_document_runs_exists(document):
    missing = set()
    for module, script, shell in SCRIPT.findall(document.read_text(encoding="utf-8")):
        path = REPO / (module.replace(".", "/") + ".py" if module else script or shell)
        if not path.is_file():
            missing.add(str(path.relative_to(REPO)))
    assert not missing, f"{document.name} runs scripts that do not exist: {', '.join(sorted(missing))}"


def test_readme_figures_are_small():
    images = [target for target, _ in relative_links(README) if target.suffix == ".png"]
    assert images, "the README shows no figure"
    sizes = {str(image.relative_to(REPO)): image.stat().st_size for image in images if image.is_file()}
    assert all(size <= FIGURE_LIMIT for size in sizes.values()), f"figures over {FIGURE_LIMIT} bytes: {sizes}"


def test_ci_runs_the_readmes_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == "python3 -m pytest -q", f".ci/run ends with {ci[-1]!r}"
    assert re.search(r"^python -m pytest -q\s", README.read_text(encoding="utf-8"), flags=re.M), (
        "README.md does not show the test command .ci/run runs, `python -m pytest -q`")


def source_files():
    """The repository's .md, .py and .sh files, without its data and outputs."""
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]
        for name in names:
            path = Path(folder) / name
            if path.suffix in (".md", ".py", ".sh"):
                yield path


def test_no_words_about_how_the_repository_was_made():
    files = list(source_files())
    assert README in files, f"source_files() misses {README}"
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in files
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if PROCESS_WORDS.search(line)]
    assert not hits, "process words in:\n" + "\n".join(hits)
