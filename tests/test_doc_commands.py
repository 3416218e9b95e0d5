"""Every `python X.py ...` command in README.md and docs/ parses with that script's own `build_parser()`.

Commands are read from code blocks (with their `\\` line continuations) and inline code. A command ends at a shell
operator (`&&`, `|`, `;`, `>`, `)`) or a `#` comment; a shell variable (`$SD`, `"$T/input.json"`) stands for a path
and is replaced by one.
"""

import contextlib
import importlib
import io
import re
import shlex

import pytest
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"\bpython3? (?:-m (benchmarks\.\w+)|([\w/]+\.py))\b(.*)")
VARIABLE = re.compile(r"\$\{?(\w+)\}?|\$\([^)]*\)")


def snippets(text):
    """The lines of every code block (continuations joined), then every inline code span outside them."""
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def arguments(rest):
    """The command's arguments: shell words up to the first operator or comment, variables made plain paths."""
    lexer = shlex.shlex(VARIABLE.sub(lambda m: f"/path/to/{m.group(1) or 'output'}", rest), posix=True,
                        punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word and set(word) <= set("&|;<>()"):
            break
        words.append(word)
    return words


def documented_commands():
    for document in DOCUMENTS:
        for snippet in snippets(document.read_text(encoding="utf-8")):
            for module, script, rest in COMMAND.findall(snippet):
                name = module or script[:-3].replace("/", ".")
                yield pytest.param(name, arguments(rest), id=f"{document.name}: {module or script} {rest.strip()}"[:90])


COMMANDS = list(documented_commands())


def test_the_documents_show_commands():
    scripts = {param.values[0] for param in COMMANDS}
    assert {"p1_train", "p1_eval", "p2_ddim", "p3_textual_inversion", "toy_data"} <= scripts, scripts


@pytest.mark.parametrize("module, argv", COMMANDS)
def test_documented_command_parses(module, argv):
    parser = importlib.import_module(module).build_parser()
    if "--help" in argv or "-h" in argv:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
        return
    with contextlib.redirect_stderr(io.StringIO()) as errors:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{module} {shlex.join(argv)}: {errors.getvalue().strip().splitlines()[-1]}")
