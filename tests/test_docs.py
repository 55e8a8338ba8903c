"""The documentation is self-contained and its pointers hold: every "docs/FILE.md, Heading"
that code, tests or docs cite names a heading that exists; every Markdown link between the
docs resolves; nothing points outside the repository or at issue numbers; the README's
layout section names every module."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SOURCES = [p for d in ("linalign", "kernels", "benchmarks", "tests")
           for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh")] + \
    [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITATION = re.compile(r'docs/([a-z_]+\.md),\s+"([^"]+)"')
LINK = re.compile(r"\]\(((?:docs/)?[a-z_]+\.md)(?:#([a-z0-9-]+))?\)")


def headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines()
            if line.startswith("#")]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_cited_headings_exist():
    missing = []
    for src in SOURCES:
        for name, heading in CITATION.findall(src.read_text(errors="replace")):
            heading = re.sub(r"\s+#?\s*", " ", heading)  # wrapped over lines of a comment
            doc = ROOT / "docs" / name
            if not doc.is_file() or heading.lower() not in [h.lower() for h in headings(doc)]:
                missing.append(f"{src.relative_to(ROOT)}: docs/{name}, \"{heading}\"")
    assert not missing, "\n".join(missing)


def test_links_between_docs_resolve():
    broken = []
    for src in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, frag in LINK.findall(src.read_text()):
            base = ROOT if target.startswith("docs/") else src.parent
            doc = base / target
            if not doc.is_file() or (frag and frag not in map(anchor, headings(doc))):
                broken.append(f"{src.relative_to(ROOT)}: ({target}#{frag})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("pattern", [r"\bSPEC\b", r"PLATFORM\.md", r"\.\./shared",
                                     r"KERNEL-NOTES", r"[Ii]ssue\s+#?\d+"])
def test_nothing_points_outside_the_repository(pattern):
    hits = [f"{src.relative_to(ROOT)}:{n}" for src in SOURCES if src.name != "test_docs.py"
            for n, line in enumerate(src.read_text(errors="replace").splitlines(), 1)
            if re.search(pattern, line)]
    assert not hits, hits[:20]


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    modules = [p.relative_to(ROOT) for d in ("linalign", "kernels", "benchmarks")
               for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh")
               and p.name != "__init__.py" and "__pycache__" not in p.parts]
    missing = [str(m) for m in modules if m.name not in layout]
    assert not missing, f"not in the README's layout section: {missing}"
