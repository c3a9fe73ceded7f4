"""Every section of docs/method.md that the code, job specs and docs cite exists as a heading there.

References are collected per line in three forms:

- after ``method.md`` (optionally followed by ``section``/``sections`` or a section sign): a list of section
  numbers joined by ``,``, ``/``, ``and`` or a range dash (hyphen or en dash), e.g. the forms ``1.3/5.9``,
  ``9.1, 9.2``, ``4.1-4.2``, ``5-6``, ``sections 1, 4.1-4.2 and 5.9``, ``3.8.1``;
- after a bare section sign, with the same list syntax;
- a bare parenthesised list of dotted numbers preceded by whitespace, the shorthand used next to other
  references and in config descriptions (``(3.6)``, ``(4.8, 5.8)``, ``(9.1-9.3)``). Only numbers whose
  components look like section numbers (1-11, no zero component) count, so values such as ``(0.9, 0.999)``,
  ``(4.0)`` or ``(3.78)`` and calls such as ``approx(1.7)`` are not taken.

Ranges ``a.b-a.d`` expand to every section in between. This file is excluded from the scan: its docstring
spells out the forms.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SKIP_DIRS = {".venv", ".git", "mlruns", "runs", "node_modules", "__pycache__"}

_NUM = r"\d+(?:\.\d+)*"
_SEP = r"(?:\s*[,/]\s*|\s*[-–]\s*|\s+and\s+)"
_LIST = rf"{_NUM}(?:{_SEP}§?\s*{_NUM})*"
METHOD_REF = re.compile(rf"method\.md\s*(?:sections?\s+|§\s*)?(?P<list>{_LIST})")
SECTION_SIGN_REF = re.compile(rf"§\s*(?P<list>{_LIST})")
_SEC = r"(?:1[01]|[1-9])"
_BARE_NUM = rf"{_SEC}\.(?:1[01]|[1-9])(?:\.[1-9])?"
BARE_REF = re.compile(rf"(?:(?<=\s)|^)\((?P<list>{_BARE_NUM}(?:{_SEP}{_BARE_NUM})*)\)")
HEADING = re.compile(r"^#{2,4}\s+(?P<num>\d+(?:\.\d+)*)\.?\s")


def scanned_files() -> list[Path]:
    """*.py and *.yaml of the repository (no virtualenv/VCS/run folders), README.md, RESULTS.md, docs/*.md."""
    files: list[Path] = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.suffix in (".py", ".yaml") and path.is_file() and path != Path(__file__).resolve():
            files.append(path)
    files += [p for p in (ROOT / "README.md", ROOT / "RESULTS.md") if p.is_file()]
    files += sorted((ROOT / "docs").glob("*.md"))
    return sorted(set(files))


def expand(ref_list: str) -> list[str]:
    """'1.2-1.4, 5.9' -> ['1.2', '1.3', '1.4', '5.9']; '5-6' -> ['5', '6']; '§4.5, §4.7' -> ['4.5', '4.7']."""
    out: list[str] = []
    items = re.findall(rf"({_NUM})(?:\s*[-–]\s*§?\s*({_NUM}))?", ref_list)
    for start, end in items:
        out.append(start)
        if not end:
            continue
        a, b = start.split("."), end.split(".")
        if len(a) == len(b) and a[:-1] == b[:-1] and int(a[-1]) < int(b[-1]):
            out += [".".join([*a[:-1], str(k)]) for k in range(int(a[-1]) + 1, int(b[-1]) + 1)]
        else:
            out.append(end)
    return out


def references_in_line(line: str) -> list[str]:
    """Section numbers cited on one line, in all three forms; spans already read are not read twice."""
    refs: list[str] = []
    for pattern in (METHOD_REF, SECTION_SIGN_REF, BARE_REF):
        for m in pattern.finditer(line):
            refs += expand(m.group("list"))
        line = pattern.sub(lambda m: " " * len(m.group(0)), line)
    return refs


def collect_references() -> list[tuple[str, int, str]]:
    """(file relative to the repo, line number, section) for every reference found."""
    found: list[tuple[str, int, str]] = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for no, line in enumerate(text.splitlines(), start=1):
            found += [(str(path.relative_to(ROOT)), no, sec) for sec in references_in_line(line)]
    return found


def method_headings() -> set[str]:
    return {m.group("num") for line in METHOD.read_text(encoding="utf-8").splitlines()
            if (m := HEADING.match(line))}


def test_reference_forms() -> None:
    """The collector reads every citation form used in the repository, and no numeric values."""
    cases = {
        "(method.md 4.8), x": ["4.8"],
        "(method.md §4.8)": ["4.8"],
        "(method.md 1.3/5.9).": ["1.3", "5.9"],
        "(method.md 9.1, 9.2)": ["9.1", "9.2"],
        "method.md 8": ["8"],
        "method.md 6.3.": ["6.3"],
        "(method.md 5-6; Table 5-6)": ["5", "6"],
        "method.md sections 1, 4.1-4.2 and 5.9": ["1", "4.1", "4.2", "5.9"],
        "(method.md 1.2, 8.1-8.4, 6.4)": ["1.2", "8.1", "8.2", "8.3", "8.4", "6.4"],
        "method.md 6.1 / 5.10 [RA]": ["6.1", "5.10"],
        "method.md 3.8.1).": ["3.8.1"],
        "(method.md 3.4); 3 extra": ["3.4"],
        "method.md 1.1: 0-based": ["1.1"],
        "method.md 9.1, ``eval.space``": ["9.1"],
        "(§4.1–4.3, Eq. 1, 3–4)": ["4.1", "4.2", "4.3"],
        "(§4.5, §4.7, §4.10)": ["4.5", "4.7", "4.10"],
        "routing (3.6), counts (3.7, 3.8.1)": ["3.6", "3.7", "3.8.1"],
        "NME (9.1-9.3)": ["9.1", "9.2", "9.3"],
        "(method.md 11) and the rule (8.1)": ["11", "8.1"],
        "approx(1.7) (0.9, 0.999) (4.0) (3.78) figsize=(6.5, 4.2) appendix A1.3": [],
    }
    for line, want in cases.items():
        assert references_in_line(line) == want, line


def test_every_cited_section_is_a_heading() -> None:
    refs = collect_references()
    print(f"{len(refs)} method.md section references in {len({f for f, _, _ in refs})} files")
    assert len(refs) > 100, f"only {len(refs)} references found: the collector is broken"
    headings = method_headings()
    missing = [f"{f}:{no}: section {sec}" for f, no, sec in refs if sec not in headings]
    assert not missing, "sections cited but missing as headings in docs/method.md:\n" + "\n".join(missing)


def test_readme_links_method() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"\]\(docs/method\.md(?:#[^)]*)?\)", readme), "README.md must link docs/method.md"
