"""The README and docs/ stay true to the code: links resolve, the README stays short, no renamed flag is documented.

The renamed flags are read from the code's own `renamed(parser, "--old", ...)` calls, each scoped to the command whose
parser registers it, so a flag renamed later is checked here without editing this file.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "data_prep" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GROUPS = ("eval", "cost", "data")  # micro-diffusion subcommands whose commands are one word further
# A command in the docs: the console script (or its module), a data_prep or benchmarks module, or make gpu-check.
COMMAND = re.compile(r"(?<![\w/.-])(micro-diffusion|micro_diffusion\.cli|data_prep[./]\w+(?:\.py)?"
                     r"|benchmarks[./]\w+(?:\.py)?|make gpu-check)(?![\w-])")
SEGMENT_END = re.compile(r"`|\s#\s|\s\|\s|$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def renamed_flags(root: Path = REPO) -> list[tuple[str, str, str]]:
    """(command scope, old flag, where) of every renamed() call in the project's code."""
    found = []
    for path in sorted([*root.glob("micro_diffusion/**/*.py"), *root.glob("data_prep/*.py"),
                        *root.glob("benchmarks/*.py")]):
        text = path.read_text(encoding="utf-8")
        if "renamed(" not in text or path.name == "argparsing.py":
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        calls = [(m.start(), m.group(1), [m.group(2)])
                 for m in re.finditer(r"\brenamed\(\s*(\w+)\s*,\s*\"(--[\w-]+)\"", text)]
        for m in re.finditer(r"for\s+(\w+)\s*,\s*\w+\s+in\s+(\(.*?\)|\[.*?\])\s*:\s*\n\s*renamed\(\s*(\w+)\s*,\s*\1\b",
                             text, re.S):
            calls.append((m.start(), m.group(3), re.findall(r"\(\s*\"(--[\w-]+)\"\s*,", m.group(2))))
        for pos, var, olds in calls:
            where = f"{path.relative_to(root)}:{text.count(chr(10), 0, pos) + 1}"
            for scope in scopes(text[:pos], var, module):
                found += [(scope, old, where) for old in olds]
    return found


def scopes(before: str, var: str, module: str) -> list[str]:
    """The commands whose parser `var` is: its subparser name(s), else the module run by `python -m`."""
    assigned = list(re.finditer(rf"\b{var}\s*=\s*(.+)", before))
    assert assigned, f"{module}: no assignment of the parser {var!r} before its renamed() call"
    value, at = assigned[-1].group(1), assigned[-1].start()
    literal = re.match(r"(?:subparser\(\s*\w+\s*,\s*|\w+\.(?:choices\[|add_parser\())\"([\w-]+)\"", value)
    if literal:
        return [literal.group(1)]
    if re.match(r"subparser\(\s*\w+\s*,\s*\w+", value):  # named by a loop variable: the first item of each tuple
        loop = list(re.finditer(r"for\s+\w+\s*,.*?\bin\s+(\[.*?\]|\(.*?\))\s*:", before[:at], re.S))
        assert loop, f"{module}: the subparser name of {var!r} comes from no loop"
        return re.findall(r"\(\s*\"([\w-]+)\"\s*,", loop[-1].group(1))
    return [module]


def command_segments() -> list[tuple[str, str, str]]:
    """(scope, text, where) of every command written in the docs (backslash continuations joined)."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))
        for number, line in enumerate(text.splitlines(), 1):
            for m in COMMAND.finditer(line):
                rest = line[m.end():]
                segment = rest[:SEGMENT_END.search(rest).start()]
                found.append((scope_of(m.group(1), segment), m.group(0) + segment,
                              f"{doc.relative_to(REPO)}:{number}"))
    return found


def scope_of(head: str, rest: str) -> str:
    """The scope renamed_flags() gives the parser of this command."""
    if head in ("micro-diffusion", "micro_diffusion.cli"):
        words = re.findall(r"^\s*([a-z][\w-]*)(?:\s+([a-z][\w-]*))?", rest)
        first, second = words[0] if words else ("", "")
        return second if first in GROUPS and second else first
    if head == "make gpu-check":
        return "benchmarks.gpu_check"
    return head.removesuffix(".py").replace("/", ".")


def stale(segments: list[tuple[str, str, str]], flags: list[tuple[str, str, str]]) -> list[str]:
    """Each documented command that uses an old flag of its own parser, or an old spelling renamed without renamed()."""
    old_by_scope: dict[str, set[str]] = {}
    for scope, old, _ in flags:
        old_by_scope.setdefault(scope, set()).add(old)
    problems = []
    for scope, text, where in segments:
        for old in sorted(old_by_scope.get(scope, ())):
            if re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text):
                problems.append(f"{where}: {old} (renamed) in {text.strip()!r}")
        if scope == "compose" and re.search(r"--layout[ =]folder\b", text):
            problems.append(f"{where}: --layout folder is now --layout flat in {text.strip()!r}")
        if scope == "report" and text.split()[:2] == ["micro-diffusion", "report"]:
            problems.append(f"{where}: `micro-diffusion report` is now `micro-diffusion cost report`")
        if scope == "mix":  # the stream root was a second positional argument, now --data-root DIR
            words = re.sub(r"--data-root[ =]\S+|--json", " ", text).split()
            positional = [w for w in words[words.index("mix") + 1:] if not w.startswith("[")]
            if len(positional) > 1:
                problems.append(f"{where}: the stream root is --data-root DIR in {text.strip()!r}")
    return problems


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve() -> None:
    broken, checked = [], 0
    for doc in DOCS:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not dest.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", dest.read_text(encoding="utf-8"), re.M)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert checked > 20, "the link pattern found almost no links"
    assert not broken, "\n".join(broken)


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move long sections to docs/"


def test_renamed_flags_are_found_in_the_code() -> None:
    flags = renamed_flags()
    pairs = {(scope, old) for scope, old, _ in flags}
    for known in [("train", "--run-dir"), ("distill", "--run-dir"), ("sample", "--model"), ("sweep", "--prompts"),
                  ("estimate", "--set"), ("data_prep.download", "--plan-only"), ("benchmarks.gpu_check", "--tiny")]:
        assert known in pairs, f"{known} not read from the code's renamed() calls: {sorted(pairs)}"


def test_no_renamed_flag_in_the_docs() -> None:
    segments = command_segments()
    assert len(segments) > 50, "the command pattern found almost no commands in the docs"
    problems = stale(segments, renamed_flags())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, bad", [
    ("micro-diffusion train recipes/a.yaml --run-dir runs/x", True),
    ("micro-diffusion sample --model models/m --out s/", True),
    ("micro-diffusion eval sweep models/m --out s/ --prompts p/", True),
    ("micro-diffusion sample models/m --out s/ --prompts p.txt", False),
    ("python -m data_prep.convert --input photos/ --format folder --out o", True),
    ("make gpu-check GPU_CHECK_ARGS=--tiny", True),
    ("micro-diffusion data compose --out d --count 4 --seed 0 --layout folder", True),
    ("micro-diffusion data mix recipes/a.yaml data/latents", True),
    ("micro-diffusion data mix recipes/a.yaml --data-root data/latents", False),
])
def test_the_check_flags_old_spellings(line: str, bad: bool) -> None:
    m = COMMAND.search(line)
    segment = (scope_of(m.group(1), line[m.end():]), line, "example")
    assert bool(stale([segment], renamed_flags())) == bad
