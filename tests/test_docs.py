"""The docs match the command line.

(a) Every command and subcommand of `malt --help` has a page in docs/ that names it, and every
    option of a command appears on that command's page (both names of a `--x/--no-x` pair).
(b) Every `malt ...` command line in README.md and docs/*.md (in code blocks and inline code
    spans) names only real commands, and only options of the command it runs.

The checkers are plain functions, so the tests below also feed them small wrong texts and
assert that they complain: a checker that cannot fail checks nothing. Only files of the
repository are read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from malt_local.cli import cli
from tests.conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
# A command documented on another command's page; any other command `malt NAME ...` is on
# docs/NAME.md, and the group itself (`malt --version`) on docs/README.md.
SHARED_PAGES = {("show",): "status.md"}
README_MAX_LINES = 250


# -- the command line --------------------------------------------------------------------------


def _context(command: click.Command) -> click.Context:
    return click.Context(command, info_name="malt")


def subcommands(group: click.Group) -> dict[str, click.Command]:
    ctx = _context(group)
    found = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            found[name] = command
    return found


def walk(
    command: click.Command = cli, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under `command`, itself first, as (path of names, command)."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in subcommands(command).items():
            yield from walk(sub, (*path, name))


def page_for(path: tuple[str, ...]) -> Path:
    if not path:
        return DOCS / "README.md"
    if path in SHARED_PAGES:
        return DOCS / SHARED_PAGES[path]
    return DOCS / f"{path[0]}.md"  # a group's subcommands share the group's page


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def documented_names(command: click.Command) -> list[str]:
    """The names a page must mention: every long name of every option (with a `--x/--no-x`
    pair, both); an option with only short names, those."""
    names = []
    for option in _options(command):
        every = [*option.opts, *option.secondary_opts]
        long = [n for n in every if n.startswith("--")]
        names.extend(long or every)
    return names


def accepted_names(command: click.Command) -> set[str]:
    """Every spelling of an option the command accepts, short ones and help included."""
    names = set(_context(command).help_option_names)
    for option in _options(command):
        names.update(option.opts)
        names.update(option.secondary_opts)
    return names


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def missing_options(text: str, command: click.Command) -> list[str]:
    """The option names of `command` that `text` does not mention."""
    return [name for name in documented_names(command) if not mentions(text, name)]


# -- command lines in Markdown ------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line in a fenced or an indented code block."""
    found = []
    fence = None
    previous_blank_or_code = True
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is not None:
            if match and match.group(1) == fence:
                fence = None
            else:
                found.append((number, line))
            continue
        if match:
            fence = match.group(1)
            previous_blank_or_code = False
            continue
        indented = line.startswith(("    ", "\t")) and line.strip() != ""
        if indented and previous_blank_or_code:
            found.append((number, line))
            continue
        previous_blank_or_code = line.strip() == ""
    return found


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside code blocks; a span may wrap onto
    the next line of its paragraph."""
    lines = text.splitlines()
    for number, _ in code_lines(text):
        lines[number - 1] = ""
    for number, line in enumerate(lines):
        if FENCE.match(line):
            lines[number] = ""
    prose = "\n".join(lines)
    found = []
    for match in re.finditer(r"(`+)(?!`)((?:(?!\1)[^\n]|\n(?!\s*\n))+?)(?<!`)\1(?!`)", prose):
        number = prose.count("\n", 0, match.start()) + 1
        found.append((number, " ".join(match.group(2).split())))
    return found


def _logical_code_lines(text: str) -> list[tuple[int, str]]:
    """Code lines with comments cut off, joined where a command goes on: a trailing backslash,
    or a synopsis's next line that starts with `[` or `--`."""
    joined: list[tuple[int, str]] = []
    open_command = False
    go_on = False
    for number, raw in code_lines(text):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        stripped = line.strip()
        continues = go_on or (open_command and stripped.startswith(("[", "--")))
        go_on = line.endswith("\\")
        line = line.removesuffix("\\")
        if continues and joined:
            joined[-1] = (joined[-1][0], joined[-1][1] + " " + line.strip())
        else:
            joined.append((number, line))
            open_command = bool(COMMAND_START.search(line))
    return joined


# `malt` where a shell would run it: at the start, after a pipe, `&&`, `;`, `$(` or a backtick,
# after a `$ ` prompt and after VAR=value assignments.
COMMAND_START = re.compile(
    r"(?:^|[|;&`(])\s*(?:\$\s+)?(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*malt(?=\s|$)"
)


def _command_words(line: str, start: int) -> list[str]:
    """The words of the command that starts at `start`, up to the end of that command: a pipe,
    `&&`, `;`, the `)` of a `$(`, or a backtick, outside `[...]` (a synopsis's `[A | B]` is one
    command)."""
    depth = 0
    end = len(line)
    i = start
    while i < len(line):
        char = line[i]
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        elif depth == 0 and (
            line.startswith(("&&", "||"), i)
            or char in ";)`"
            or (char == "|" and (i == 0 or line[i - 1].isspace()))
        ):
            end = i
            break
        i += 1
    return line[start:end].split()


def malt_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, words after `malt`) of every command line that runs malt."""
    found = []
    for number, line in [*_logical_code_lines(text), *inline_spans(text)]:
        for match in COMMAND_START.finditer(line):
            found.append((number, _command_words(line, match.end())))
    return sorted(found)


def is_placeholder(word: str) -> bool:
    """COMMAND, QUESTIONS..., …: a word that stands for something, not a command name."""
    return not any(c.islower() for c in word)


OPTION = re.compile(r"^[\[(]*(--?[A-Za-z][\w-]*)")


def check_command(words: list[str]) -> list[str]:
    """What is wrong with `malt WORDS`: an unknown command, an option its command lacks."""
    command: click.Command = cli
    path = ["malt"]
    rest = list(words)
    while isinstance(command, click.Group) and rest and not rest[0].startswith(("-", "[")):
        word = rest.pop(0)
        if is_placeholder(word):
            return []  # `malt COMMAND --help`: no command to check the options against
        sub = subcommands(command).get(word)
        if sub is None:
            return [f"`{' '.join(path)} {word}`: no such command"]
        command = sub
        path.append(word)
    accepted = accepted_names(command)
    problems = []
    for word in rest:
        match = OPTION.match(word)
        if match and match.group(1) not in accepted:
            problems.append(f"`{' '.join(path)}` has no option {match.group(1)}")
    return problems


def check_text(text: str) -> list[str]:
    """Every problem of every malt command line in a Markdown text, as `LINE: problem`."""
    return [
        f"{number}: {problem}"
        for number, words in malt_commands(text)
        for problem in check_command(words)
    ]


# -- links --------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and Forgejo make it."""
    text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    code = {number for number, _ in code_lines(text)}
    seen: dict[str, int] = {}
    found = set()
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match or number in code:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of a Markdown file whose file (or heading) does not exist, or that leave
    the repository."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        where = (path.parent / file_part).resolve() if file_part else path
        if not where.exists():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where.read_text()):
            problems.append(f"{path.name}: {target}: no such heading")
        elif root.resolve() not in where.parents:
            problems.append(f"{path.name}: {target}: outside the repository")
    return problems


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# -- the real docs ------------------------------------------------------------------------------

COMMANDS = list(walk())


def _id(item: tuple[tuple[str, ...], click.Command]) -> str:
    return " ".join(("malt", *item[0]))


def test_the_walk_sees_groups_and_their_subcommands():
    paths = {path for path, _ in COMMANDS}
    assert {(), ("run",), ("pull",), ("db",), ("db", "path"), ("show",)} <= paths


@pytest.mark.parametrize("item", COMMANDS, ids=_id)
def test_every_command_has_a_page_that_names_it(item):
    path, _ = item
    page = page_for(path)
    assert page.is_file(), f"`{_id(item)}` has no page: write {page.relative_to(ROOT)}"
    name = _id(item) if path else "malt --help"
    assert mentions(page.read_text(encoding="utf-8"), name), f"{page.name} never says `{name}`"


@pytest.mark.parametrize("item", COMMANDS, ids=_id)
def test_every_option_is_on_its_commands_page(item):
    path, command = item
    page = page_for(path)
    missing = missing_options(page.read_text(encoding="utf-8"), command)
    assert not missing, f"{page.relative_to(ROOT)} lacks {_id(item)}'s {', '.join(missing)}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_name_real_commands_and_options(path):
    problems = check_text(path.read_text(encoding="utf-8"))
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_docs_have_command_lines_to_check():
    # If the extraction broke, the test above would pass on nothing.
    found = [words for p in markdown_files() for _, words in malt_commands(p.read_text())]
    assert len(found) > 50
    assert ["db", "path"] in found


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_readme_is_short_and_keeps_the_ci_command():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make test" in text  # .ci/run runs the README's test command
    assert "docs/README.md" in text


def test_the_index_links_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


# -- the checkers can fail ----------------------------------------------------------------------


def _command(*path: str) -> click.Command:
    return dict(COMMANDS)[path]


def test_a_page_without_an_option_is_reported():
    page = "malt pull SPEC [--file PATH] [--revision REV] [--dataset D] [-q | --quiet] [--json]"
    assert missing_options(page, _command("pull")) == ["--trust"]
    assert missing_options(page + " --trust", _command("pull")) == []


def test_a_longer_flag_does_not_count_as_a_shorter_one():
    # --model-revision and --model-sha256 must not stand in for --model.
    page = " ".join(f"`{n}`" for n in documented_names(_command("run")) if n != "--model")
    assert missing_options(page + " --model-revision --no-model", _command("run")) == ["--model"]


def test_both_names_of_a_flag_pair_must_be_documented():
    @click.command()
    @click.option("--colour/--no-colour", default=True)
    @click.option("-v", "--verbose", is_flag=True)
    @click.option("-x", is_flag=True)
    def fake(colour, verbose, x):
        pass

    assert documented_names(fake) == ["--colour", "--no-colour", "--verbose", "-x"]
    assert missing_options("--colour, --verbose, -x", fake) == ["--no-colour"]
    assert missing_options("--colour/--no-colour --verbose -x", fake) == []
    assert {"--server-n", "--no-server-n"} <= set(documented_names(_command("run")))


def test_an_invented_option_is_reported_where_a_shell_would_run_malt():
    text = "\n".join(
        [
            "```bash",
            "malt run --n 3 --frobnicate q.jsonl",  # 2
            "$ malt status --max-tokens 5",  # 3: an option of another command
            "cat q.jsonl | malt export --colour red",  # 4
            "make demo && malt show q1 -z",  # 5: a short flag
            'datasette "$(malt db path --verbose)"',  # 6
            "CUDA_VISIBLE_DEVICES=0 malt run q.jsonl --gpus 2 &",  # 7
            "malt eval q.jsonl \\",  # 8: continued on the next line
            "    --adaptors adapters/",
            "malt train [EXPORT_DIR] [--role R]",  # 10: a synopsis going on
            "           [--bogus N]",
            "```",
            "",
            "Prose with `malt view --hots 0.0.0.0` in it.",  # 14
            "",
            "    malt models --all",  # 16: an indented code block
            "",
            "A span that wraps: `malt pull",  # 18
            "--mirror x`.",
        ]
    )
    assert check_text(text) == [
        "2: `malt run` has no option --frobnicate",
        "3: `malt status` has no option --max-tokens",
        "4: `malt export` has no option --colour",
        "5: `malt show` has no option -z",
        "6: `malt db path` has no option --verbose",
        "7: `malt run` has no option --gpus",
        "8: `malt eval` has no option --adaptors",
        "10: `malt train` has no option --bogus",
        "14: `malt view` has no option --hots",
        "16: `malt models` has no option --all",
        "18: `malt pull` has no option --mirror",
    ]


def test_an_invented_command_is_reported():
    text = "```\nmalt frobnicate --n 3\nmalt db size\n```\nand `malt stats`\n"
    assert check_text(text) == [
        "2: `malt frobnicate`: no such command",
        "3: `malt db size`: no such command",
        "5: `malt stats`: no such command",
    ]


def test_real_command_lines_pass():
    text = "\n".join(
        [
            "```",
            "malt run QUESTIONS [--n 3] [--run ID | --new-run] [--engine batched|simple]",
            "         [--server-n | --no-server-n] [--model=M] [-m M] [--help]",
            "malt pull -q smollm2-135m:Q4_1   # --not-an-option in a comment",
            "malt models | grep llama --count",
            "malt COMMAND --help",
            "malt --version",
            "malt db path",
            "```",
            "`malt-local[train]`, `malt_local/`, `~/.cache/malt/ --x`, `$MALT_HOME`, `malt`.",
            "`pip install malt --upgrade` is pip's line, not malt's.",
        ]
    )
    assert check_text(text) == []
    assert len(malt_commands(text)) == 7


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = tmp_path / "repo" / "page.md"
    page.write_text(
        "# A page\n\n[ok](#a-page) [gone](nowhere.md) [bad](#no-heading) [out](../outside.md)\n"
        "![image](page.md) [web](https://example.org/x.md)\n"
    )
    assert broken_links(page, root=tmp_path / "repo") == [
        "page.md: nowhere.md: no such file",
        "page.md: #no-heading: no such heading",
        "page.md: ../outside.md: outside the repository",
    ]


def test_slugs_follow_the_forges():
    assert slug("`--engine openai`: a server instead of the embedded model") == (
        "--engine-openai-a-server-instead-of-the-embedded-model"
    )
    assert slug("Several processes, one database (one per GPU)") == (
        "several-processes-one-database-one-per-gpu"
    )
    assert anchors("# A\n\n## A\n\n```\n# not a heading\n```\n") == {"a", "a-1"}
