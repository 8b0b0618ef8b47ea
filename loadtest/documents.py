"""Long English documents for benchmarks: the Python documentation (Debian's python3-doc) or files the user gives."""

from __future__ import annotations

import html.parser
from pathlib import Path

PYTHON_DOC_DIRS = (Path("/usr/share/doc/python3-doc/html"), Path("/usr/share/doc/python3/html"))


class _TextExtractor(html.parser.HTMLParser):
    """The readable text of a Sphinx page: paragraphs, skipping scripts, styles and navigation."""

    _SKIP = {"script", "style", "nav", "head", "footer"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in ("p", "li", "pre", "h1", "h2", "h3", "dd", "dt"):
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def html_to_text(source: str) -> str:
    parser = _TextExtractor()
    parser.feed(source)
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def python_doc_texts(min_chars: int = 20_000, limit: int = 64) -> list[str]:
    """Texts of the longest-enough pages of the installed Python documentation, in a stable order."""
    root = next((d for d in PYTHON_DOC_DIRS if d.is_dir()), None)
    if root is None:
        raise FileNotFoundError(
            "no Python documentation found: install Debian's python3-doc (apt-get install python3-doc) or pass --docs"
        )
    texts = []
    for page in sorted((root / "library").glob("*.html")):
        text = html_to_text(page.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= min_chars:
            texts.append(text)
        if len(texts) >= limit:
            break
    return texts


def load_documents(paths: list[str] | None) -> list[str]:
    """User text files (.html pages are reduced to their text), else the Python documentation."""
    if not paths:
        return python_doc_texts()
    docs = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8", errors="replace")
        docs.append(html_to_text(text) if p.endswith((".html", ".htm")) else text)
    return docs
