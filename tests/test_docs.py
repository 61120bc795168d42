"""The README and docs/: every relative link and anchor resolves, every page is reachable,
and the code they show runs (python), parses (vspec) or prints what is shown (`$ verify ...`)."""

import importlib.util
import re
import shlex
import textwrap
from pathlib import Path

import pytest

import verify
from verify.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return found


def links(page: Path) -> list:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}: no such heading"


def test_every_docs_page_is_reachable_from_the_readme():
    reachable, frontier = set(), [ROOT / "README.md"]
    while frontier:
        page = frontier.pop()
        for target in links(page):
            linked = (page.parent / target.partition("#")[0]).resolve()
            if linked.suffix == ".md" and linked.exists() and linked not in reachable:
                reachable.add(linked)
                frontier.append(linked)
    assert {p.resolve() for p in PAGES[2:]} <= reachable


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# -- the code the pages show: run, or parsed, and compared where its output is shown -------

BLOCK = re.compile(r"(<!-- doc: ([^>]*?) -->\n)?[ ]*```(\w*)\n(.*?)```", re.DOTALL)


def blocks(page: Path, language: str) -> list:
    """(the block's text, its marker or None) for each block of ``language`` on ``page``."""
    return [(textwrap.dedent(body), marker) for _, marker, lang, body in BLOCK.findall(page.read_text())
            if lang == language]


def _pages_with(language: str) -> list:
    return [page for page in PAGES if blocks(page, language)]


@pytest.mark.parametrize("page", _pages_with("python"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_in_order_as_a_reader_would_paste_it(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    if "triton" in page.read_text() and importlib.util.find_spec("triton") is None:
        pytest.skip("a block checks the Triton example: pip install -e '.[triton]'")
    namespace = {}
    for code, marker in blocks(page, "python"):
        if marker == "no-run":  # a fragment that shows a shape, not a program
            continue
        if marker and marker.startswith("raises "):
            with pytest.raises(getattr(verify, marker.split()[1])):
                exec(compile(code, f"<{page.name}>", "exec"), namespace)  # noqa: S102 - our own docs
        else:
            exec(compile(code, f"<{page.name}>", "exec"), namespace)  # noqa: S102 - our own docs


@pytest.mark.parametrize("page", _pages_with("vspec"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_spec_block_parses_and_matches_the_file_it_names(page):
    for text, _ in blocks(page, "vspec"):
        verify.parse(text)
        named = re.match(r"# (examples/\S+\.vspec)", text)
        if named:  # the spec lines shown are the file's (comments aside)
            def statements(t):
                return [line.split("#")[0].strip() for line in t.splitlines() if line.split("#")[0].strip()]

            assert statements(text) == statements((ROOT / named.group(1)).read_text())


def _shown_commands():
    for page in PAGES:
        for text, _ in blocks(page, ""):
            if text.startswith("$ verify "):
                command, _, shown = text.partition("\n")
                yield pytest.param(command[2:], shown, id=f"{page.name}: {command[2:]}")


@pytest.mark.parametrize("command, shown", list(_shown_commands()))
def test_every_verify_command_shown_prints_what_is_shown(command, shown, monkeypatch, capsys):
    # Counts of points depend on the examples run (the quick profile runs few): digits are compared
    # as digits where the command checks, exactly where it explains.
    monkeypatch.chdir(ROOT)
    code = main(shlex.split(command)[1:])
    printed = capsys.readouterr().out
    assert code == 0
    if command.startswith("verify check"):
        def mask(text):
            return re.sub(r"\d+", "N", text)

        lines = [mask(line) for line in printed.strip().splitlines() if not line.strip().startswith(("rejected", "weak"))]
        expected = [mask(line) for line in shown.strip().splitlines() if not line.strip().startswith(("rejected", "weak"))]
        assert lines == expected
    else:
        assert printed.strip() == shown.strip()
