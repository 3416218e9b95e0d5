"""Markdown and prerequisite helpers shared by the report's parts (report_p1.py, report_p2.py, report_p3.py)."""

from pathlib import Path

from utils import Hw2Error


def figure(out, path, caption):
    """Markdown for an image under OUT, by its relative path."""
    return f"![{caption}]({Path(path).relative_to(out).as_posix()})"


def table(header, rows):
    """A markdown table from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def code(text):
    """Text as a markdown code span: prompts hold "<new1>", which markdown would take for an HTML tag."""
    return f"`{text}`"


def percent(correct, total):
    return f"{100 * correct / total:.2f}% ({correct}/{total})"


def require(path, what, fix):
    """Raise the one-line "missing prerequisite" error unless `path` exists."""
    if not Path(path).exists():
        raise Hw2Error(f"{what} not found at {path}: {fix}")
    return Path(path)


def skipped_step(context, what, reason):
    """One step of a part cannot run: one line on the console, and the markdown that says so."""
    context.say(f"{what}: skipped: {reason}")
    return [f"**Skipped:** {reason}.", ""]
