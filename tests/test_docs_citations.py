"""Every citation in the repository resolves inside the repository.

Code and docs cite the method as ``METHOD x.y``: a section heading of docs/METHOD.md. They must not cite
documents that live outside the repository (the project's old planning notes), which a user never sees.
Scanned: every file git knows (tracked, plus untracked files that are not ignored) ending in .py, .yaml,
.yml, .sh, .md or .toml; this file is left out because it spells the patterns it looks for.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_DOC = ROOT / "docs" / "METHOD.md"
SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".md", ".toml")

# Documents outside the repository. "shared/" only where it is not an absolute path such as the GPU
# configs' run folder /shared/runs.
OUTSIDE = re.compile(r"\bSPEC\b|\bLESSONS\b|CPU_STACK|\bDESIGN\.md|\bSTYLE\.md|(?<![\w/.-])shared/")
# "METHOD 6.1 step B, 14.1", "METHOD 6-8", "METHOD 5.3 / 8", "METHOD 2.1, 10.1": the whole citation.
SECTION = r"\d+(?:\.\d+)*"
STEP = r"step\s+\w+(?:\s*-\s*\w+)?"
CITATION = re.compile(rf"\bMETHOD\s+((?:{SECTION}|{STEP})(?:\s*(?:[-,/]|and)\s*(?:{SECTION}|{STEP})|\s+{STEP})*)")


def scanned_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to list the repository's files with")
    me = Path(__file__).resolve()
    paths = {ROOT / line for line in out.splitlines() if line.endswith(SUFFIXES)}
    return sorted(p for p in paths if p.is_file() and p.resolve() != me)


def method_sections() -> set[str]:
    """Section numbers of docs/METHOD.md's headings: ``## 7. ...`` -> "7", ``### 7.2 ...`` -> "7.2"."""
    return set(re.findall(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", METHOD_DOC.read_text(encoding="utf-8"), flags=re.M))


def cited_sections(citation: str) -> list[str]:
    """The section numbers of one citation (step labels are not sections).

    >>> cited_sections("6.1 step 3-4, 14.1"), cited_sections("6-8"), cited_sections("5.3 / 8")
    (['6.1', '14.1'], ['6', '8'], ['5.3', '8'])
    """
    return re.findall(SECTION, re.sub(STEP, " ", citation))


def citations(text: str) -> list[tuple[int, str]]:
    """``(line number, citation)`` of every METHOD citation in ``text``."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).strip()) for m in CITATION.finditer(text)]


def test_the_parsers_read_what_the_code_writes():
    text = 'x = 1  # METHOD 7.2 step 11: GT j\n"""METHOD 6.1 step B, 14.1 and METHOD 5.3 / 8."""\nMETHOD 12\'s'
    assert [(n, cited_sections(c)) for n, c in citations(text)] == [
        (1, ["7.2"]), (2, ["6.1", "14.1"]), (2, ["5.3", "8"]), (3, ["12"])]
    assert {"1", "1.1", "2.5", "6.1", "7.2", "14.4"} <= method_sections()
    assert OUTSIDE.search("out_dir: /shared/runs/x") is None
    assert OUTSIDE.search("QWEN_SPECIAL_TOKENS, kind: spec") is None
    assert OUTSIDE.search("see shared/notes.md") and OUTSIDE.search("(SPEC 7.1)")


def test_no_file_cites_documents_outside_the_repository():
    found = []
    for path in scanned_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert found == [], "cite docs/METHOD.md (METHOD x.y) or a doc in the repository instead:\n" + "\n".join(found)


def test_every_method_citation_names_a_section_of_the_method_doc():
    sections = method_sections()
    wrong = []
    for path in scanned_files():
        for n, citation in citations(path.read_text(encoding="utf-8", errors="replace")):
            missing = [s for s in cited_sections(citation) if s not in sections]
            if missing:
                wrong.append(f"{path.relative_to(ROOT)}:{n}: METHOD {citation} (no section {', '.join(missing)})")
    assert wrong == [], f"docs/METHOD.md has sections {sorted(sections)}; unresolved:\n" + "\n".join(wrong)
