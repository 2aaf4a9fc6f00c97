"""The documentation says only what the code does: README.md and docs/**/*.md.

- the generated reference pages (scripts/gen-reference) are what the code generates now;
- every relative link points at a file of the repository (and, for a markdown file, at one of
  its headings or anchors), and no link or path leaves the repository;
- every `dgxvm COMMAND [SUBCOMMAND] [--option]` the docs write in code exists in the click tree;
- every config key they write (`section.key`, `[section] key`, `partitions.NAME.key`, and the
  keys of a ```toml example) exists in the config dataclasses;
- the keys docs/reference/json.md and the words docs/reference/admincomment.md list exist in
  the code.

A failure names the file, the line and what to fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.machinery
import importlib.util
import re
import shlex
from functools import cache
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]


@cache
def gen():
    """scripts/gen-reference as a module (it has no .py suffix)."""
    path = ROOT / "scripts" / "gen-reference"
    loader = importlib.machinery.SourceFileLoader("gen_reference", str(path))
    spec = importlib.util.spec_from_loader("gen_reference", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the generated pages ---------------------------------------------------------------------------
def test_generated_reference_is_current(tmp_path):
    g = gen()
    g.main(["gen-reference", str(tmp_path)])
    stale = []
    for name in g.GENERATED:
        committed = ROOT / name
        fresh = (tmp_path / name).read_text()
        if not committed.exists() or committed.read_text() != fresh:
            stale.append(name)
    assert not stale, (f"{', '.join(stale)} differ from what the code generates: run "
                       f"scripts/gen-reference and commit the result")


# -- markdown: code spans, code blocks, links ------------------------------------------------------
FENCE = re.compile(r"^\s*(```|~~~)")


def split_markdown(text: str):
    """(prose lines, code lines): [(line number, text)], fenced blocks apart from the rest."""
    prose, code, in_code = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        (code if in_code else prose).append((n, line))
    return prose, code


def code_spans(line: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`]+)`(?!`)", line.replace("``", "\0\0"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation out, spaces to '-'."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    text = path.read_text()
    prose, _ = split_markdown(text)
    seen: dict[str, int] = {}
    out = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    for _, line in prose:
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def link_problems(path: Path) -> list[str]:
    problems = []
    prose, _ = split_markdown(path.read_text())
    for n, line in prose:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel(path)}:{n}: link {target!r}"
            if ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{where} leaves the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file {rel(dest) if ROOT in dest.parents else dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: {rel(dest)} has no heading or anchor #{anchor}")
    return problems


def test_relative_links_resolve():
    problems = [p for f in doc_files() for p in link_problems(f)]
    assert not problems, "dead or outside links:\n" + "\n".join(problems)


def test_no_path_outside_the_repository():
    problems = []
    for f in doc_files():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\.\./shared/|DESIGN\.md", line):
                problems.append(f"{rel(f)}:{n}: names a file outside the repository: "
                                f"{line.strip()[:100]}")
    assert not problems, "\n".join(problems)


# -- dgxvm commands the docs write -----------------------------------------------------------------
@cache
def tree() -> dict[tuple[str, ...], click.Command]:
    return {path[1:]: cmd for path, cmd in gen().command_tree()}


GLOBAL_WITH_VALUE = ("--config", "--sysfs-root", "--state-dir")
STOP = re.compile(r"\s(?:\||\|\||&&|;|>|>>|<|2>|#)\s|\s--(?:\s|$)|[)`\"]|\$\(")
WORD = re.compile(r"[a-z][a-z0-9-]*")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)")


def command_mentions(text: str):
    """Each `dgxvm ...` in ``text`` as its words up to the end of the command: a shell
    operator, a comment, ` -- ` (what follows is the command `dgxvm run` runs), a quote."""
    for m in re.finditer(r"(?:^|(?<=[\s($`'\"]))(?:[\w./-]*/)?dgxvm(?=\s)", text):
        rest = text[m.end():]
        stop = STOP.search(rest)
        yield rest[:stop.start()] if stop else rest


def command_problem(mention: str) -> str | None:
    """Why ``mention`` (what follows `dgxvm`) names no command or option of the click tree;
    None when it does, or when it is no command line (a log line `dgxvm prolog: job 11`, a
    placeholder `dgxvm COMMAND --help`)."""
    text = re.split(r"\s--(?:\s|$)", mention)[0].replace("\\|", "|").replace("[", " ").replace("]", " ")
    try:
        words = shlex.split(text, comments=False, posix=True)
    except ValueError:
        words = text.split()
    root = tree()[()]
    i = 0
    while i < len(words) and words[i].startswith("-"):           # global options first
        opt = words[i].split("=", 1)[0]
        if opt not in gen().options_of(root):
            return f"no global option {opt} (a command's option goes after the command)"
        i += 1 + (opt in GLOBAL_WITH_VALUE and "=" not in words[i])
    if i >= len(words) or not all(WORD.fullmatch(w) for w in words[i].split("|")):
        return None                                               # no command word: not a command line
    problems = []
    for name in words[i].split("|"):
        path = (name,)
        if path not in tree():
            known = [p[0] for p in tree() if len(p) == 1]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            if close or len(words[i].split("|")) > 1:
                problems.append(f"no command `dgxvm {name}`"
                                + (f" (`dgxvm {close[0]}`?)" if close else ""))
            # else: prose in a code span or log line ("no dgxvm domain named x"), not a command
            continue
        cmd = tree()[path]
        j = i + 1
        if isinstance(cmd, click.Group) and j < len(words) and all(
                WORD.fullmatch(w) for w in words[j].split("|")):
            subs = words[j].split("|")
            for sub in subs:
                if path + (sub,) not in tree():
                    problems.append(f"no command `dgxvm {name} {sub}`")
            if len(subs) == 1 and path + (subs[0],) in tree():
                cmd_opts = gen().options_of(tree()[path + (subs[0],)])
            else:
                cmd_opts = [o for s in subs if path + (s,) in tree()
                            for o in gen().options_of(tree()[path + (s,)])]
            allowed = set(cmd_opts) | set(gen().options_of(cmd))
            label = f"dgxvm {name} {words[j]}"
        else:
            allowed = set(gen().options_of(cmd))
            label = f"dgxvm {name}"
        allowed |= set(gen().options_of(root))
        for opt in OPTION.findall(" ".join(words[i + 1:])):
            if opt.split("=")[0] not in allowed:
                problems.append(f"`{label}` has no option {opt}")
    return "; ".join(problems) or None


def command_problems(path: Path) -> list[str]:
    out = []
    prose, code = split_markdown(path.read_text())
    texts = [(n, span) for n, line in prose for span in code_spans(line)] + code
    for n, text in texts:
        for mention in command_mentions(text):
            problem = command_problem(mention)
            if problem:
                out.append(f"{rel(path)}:{n}: `dgxvm{mention.rstrip()}`: {problem}")
    return out


def test_commands_the_docs_name_exist():
    problems = [p for f in doc_files() for p in command_problems(f)]
    assert not problems, ("commands or options the docs name that the click tree "
                          "(slurm_dgxvm/cli) does not have:\n" + "\n".join(problems))


@pytest.mark.parametrize("mention, ok", [
    (" run -- nvidia-smi --foo", True),
    (" --sysfs-root /tmp/dgx2 --state-dir /tmp/s topology show", True),
    (" image show|install|remove|default", True),
    (" create|delete|list", True),
    (" image-cache list --json", True),
    (" host --etc-root DIR --proc-root DIR", True),
    (" prolog: job 11 (user alice)", True),
    (" COMMAND --help", True),
    (" topology shw", False),
    (" reconcile --dry-runn", False),
    (" gpu clear 1 --note x --force", True),
    (" imagecache list", False),
])
def test_command_checker(mention, ok):
    assert (command_problem(mention) is None) == ok, command_problem(mention)


# -- config keys the docs write --------------------------------------------------------------------
@cache
def config_keys() -> dict[str, set[str]]:
    from slurm_dgxvm import config
    out = {name: {f.name for f in dataclasses.fields(cls)}
           for name, cls in config._SECTIONS.items()}
    out["partitions"] = {f.name for f in dataclasses.fields(config.PartitionConfig)}
    return out


#: `section.word` that is a file name, not a key (slurm.conf, fabric.py, containers.log)
FILE_SUFFIXES = {"conf", "py", "json", "md", "toml", "service", "log", "lock", "txt", "sh",
                 "xml", "prom", "iso", "qcow2", "raw", "fragment", "example", "d", "j2", "h2m",
                 "corrupt"}


def config_problems(path: Path) -> list[str]:
    sections = "|".join(config_keys())
    dotted = re.compile(rf"(?<![\w/.$-])({sections})\.(?:(NAME|[A-Za-z0-9_-]+)\.)?([a-z_]+)"
                        rf"(?![\w/-]|\.\w)")
    bracket = re.compile(rf"\[({sections})(?:\.[A-Za-z0-9_.-]+)?\]\s+([a-z_]+)")
    out = []
    prose, _ = split_markdown(path.read_text())
    for n, line in prose:
        for span in code_spans(line):
            found = []
            for m in dotted.finditer(span):
                section, part, key = m.groups()
                if (section != "partitions") == (part is not None):
                    continue            # host.a.b, partitions.NAME: not a key
                if key in FILE_SUFFIXES:
                    continue
                found.append((section, key))
            for m in bracket.finditer(span):
                found.append(m.groups())
            for section, key in found:
                if key not in config_keys()[section]:
                    out.append(f"{rel(path)}:{n}: `{span}`: no config key {key} in [{section}] "
                               f"(known: {', '.join(sorted(config_keys()[section]))})")
    return out


def toml_blocks(text: str):
    """(first line, text) of each ```toml block."""
    block, start = None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if block is None and re.match(r"\s*```toml\s*$", line):
            block, start = [], n + 1
        elif block is not None and FENCE.match(line):
            yield start, "\n".join(block)
            block = None
        elif block is not None:
            block.append(line)


def toml_problems(path: Path) -> list[str]:
    """Every key of a ```toml example that is dgxvm.toml's (its tables are dgxvm's sections)."""
    import tomllib
    out = []
    for n, text in toml_blocks(path.read_text()):
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            out.append(f"{rel(path)}:{n}: a ```toml block that is not TOML: {exc}")
            continue
        tables = [(name, value) for name, value in doc.items() if name != "partitions"]
        tables += [("partitions", t) for t in doc.get("partitions", {}).values()]
        for section, table in tables:
            if section not in config_keys() or not isinstance(table, dict):
                out.append(f"{rel(path)}:{n}: ```toml block: no section [{section}] in "
                           f"dgxvm.toml")
                continue
            for key in table:
                if key not in config_keys()[section]:
                    out.append(f"{rel(path)}:{n}: ```toml block: no key {key} in [{section}]")
    return out


def test_config_keys_the_docs_name_exist():
    problems = [p for f in doc_files() for p in config_problems(f) + toml_problems(f)]
    assert not problems, ("config keys the docs name that slurm_dgxvm/config.py does not "
                          "have:\n" + "\n".join(problems))


# -- the hand-written reference pages --------------------------------------------------------------
@cache
def names_in_code() -> frozenset[str]:
    """Every string constant, dataclass field, keyword and attribute name in slurm_dgxvm/:
    what a JSON key of dgxvm's output can be."""
    out = set()
    for f in (ROOT / "slurm_dgxvm").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
            elif isinstance(node, ast.keyword) and node.arg:
                out.add(node.arg)
            elif isinstance(node, ast.Attribute):
                out.add(node.attr)
            elif isinstance(node, ast.FunctionDef):
                out.add(node.name)          # properties serialised by name
    return frozenset(out)


def first_column_spans(path: Path) -> list[tuple[int, str]]:
    out = []
    prose, _ = split_markdown(path.read_text())
    for n, line in prose:
        m = re.match(r"\|\s*([^|]*?)\s*\|", line)
        if m and not set(m.group(1)) <= set("-: "):
            out += [(n, s) for s in code_spans(m.group(1))]
    return out


def test_json_keys_exist_in_the_code():
    path = ROOT / "docs" / "reference" / "json.md"
    problems = []
    spans = first_column_spans(path)
    assert len(spans) > 100, "json.md lists the keys in the first column of its tables"
    for n, span in spans:
        for key in re.split(r"[.\s]+", span.replace("[]", "")):
            if key and key not in names_in_code():
                problems.append(f"{rel(path)}:{n}: JSON key {key!r} appears nowhere in "
                                f"slurm_dgxvm/")
    assert not problems, "\n".join(problems)


def test_admincomment_words_exist_in_the_code():
    from slurm_dgxvm.slurm import accounting
    path = ROOT / "docs" / "reference" / "admincomment.md"
    spans = first_column_spans(path)
    listed = {s for _, s in spans}
    assert set(accounting.KEYS) <= listed, (f"{rel(path)} lacks the AdminComment keys "
                                            f"{sorted(set(accounting.KEYS) - listed)}")
    unknown = [f"{rel(path)}:{n}: {s!r}" for n, s in spans if s not in accounting.KEYS]
    assert not unknown, ("AdminComment keys the page lists that slurm_dgxvm/slurm/"
                         "accounting.py KEYS does not have:\n" + "\n".join(unknown))
    assert accounting.PREFIX in path.read_text()
