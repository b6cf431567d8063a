"""Documents from files: the bytes of a PDF, HTML, Markdown or text file parsed into its text, its title and,
for a PDF, where each page starts in the text. Plain functions, one per format; each parser library is imported
on first use, so a corpus of tables never loads one. A file that cannot be parsed raises Unreadable with a short
reason, which the build counts and lists as a skipped document (docs/build.md, "Folders of files").

Libraries (docs/build.md says why): pypdfium2 (PDFium, Apache-2.0/BSD-3) for PDF text, no OCR; trafilatura
(Apache-2.0) for the main text of an HTML page; Markdown and text need none.
"""

from __future__ import annotations

import codecs
import re
from typing import NamedTuple

import numpy as np

# file name endings -> the format a document file is parsed as
DOCUMENT_FORMATS = {
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
}
TEXT = "text"  # the column of a file's row (text/corpus.py FILE_SCHEMA) its parsed text is in
# metadata that changes when a file is copied, moved or touched but its content does not: left out of the
# content hash, so a reindex reuses the vectors of such a file (text/reuse.py)
UNHASHED_COLUMNS = ("path", "mtime")
PAGE_BREAK = "\n\n"  # between the pages of a PDF in its text
TITLE_CHARS = 200  # a title from a first line is cut here

# why a file was skipped: the keys of the manifest's skipped counts
EMPTY_FILE = "file_empty"
TOO_BIG = "file_over_max_file_bytes"
NOT_TEXT = "file_not_text"  # NUL bytes or not UTF-8 in a file named as text
ENCRYPTED = "file_encrypted_pdf"
DAMAGED = "file_damaged"  # the parser refused it: a damaged PDF, HTML it cannot read
NO_TEXT = "file_without_text"  # parsed, but no text: a scanned PDF (no OCR), a page of navigation only


class ParsedDocument(NamedTuple):
    text: str
    title: str | None
    page_starts: list[int]  # PDF: where each page starts in `text` (characters; page n at [n - 1]); [] otherwise


class Unreadable(Exception):
    """A file that is skipped: its reason (one of the constants above) and what the parser said."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def document_format(path: str) -> str | None:
    """The format a file is parsed as, from its name ("pdf", "html", "markdown", "text"), or None."""
    lower = path.lower()
    return next((fmt for suffix, fmt in DOCUMENT_FORMATS.items() if lower.endswith(suffix)), None)


def parse_document(data: bytes, fmt: str) -> ParsedDocument:
    """The file's text, title and page starts; Unreadable when it is empty, cannot be parsed or holds no text."""
    if not data:
        raise Unreadable(EMPTY_FILE, "the file is empty")
    try:
        parsed = PARSERS[fmt](data)
    except (Unreadable, ImportError):  # a parser that is not installed is the build's failure, not the file's
        raise
    except Exception as exc:  # a parser library's own failure on one file must not end the build: skipped
        raise Unreadable(DAMAGED, f"{type(exc).__name__}: {exc}") from exc
    if not parsed.text.strip():
        raise Unreadable(NO_TEXT, "no text found" + (" (a scanned PDF? there is no OCR)" if fmt == "pdf" else ""))
    return parsed


def decode_text(data: bytes) -> str:
    """A text file's characters: UTF-8 (a BOM dropped), or UTF-16 with its BOM; newlines as \\n. Unreadable when
    it holds NUL bytes (a binary file with a text name) or is not UTF-8."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return normalized_newlines(data.decode("utf-16"))
        except UnicodeDecodeError as exc:
            raise Unreadable(
                NOT_TEXT, f"not UTF-16 past its byte-order mark ({exc.reason} at byte {exc.start})"
            ) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise Unreadable(NOT_TEXT, f"NUL byte at offset {nul}: a binary file?")
    try:
        return normalized_newlines(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise Unreadable(NOT_TEXT, f"not UTF-8 ({exc.reason} at byte {exc.start}): save it as UTF-8") from None


def normalized_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def first_line(text: str) -> str | None:
    """The first non-blank line, trimmed and cut at TITLE_CHARS: the title of a text without one."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:TITLE_CHARS]
    return None


def parse_text(data: bytes) -> ParsedDocument:
    text = decode_text(data)
    return ParsedDocument(text, first_line(text), [])


# a heading line: "# Title", up to three spaces before it, closing #s dropped (CommonMark's ATX heading)
ATX_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
SETEXT_UNDERLINE = re.compile(r" {0,3}(=+|-+)[ \t]*")  # under a line of text: that line is a heading
FENCE = re.compile(r" {0,3}(```|~~~)")
FRONT_MATTER = re.compile(r"---\n(.*?\n)---\n", re.DOTALL)  # YAML at the very start (Jekyll, Hugo, MkDocs)
FRONT_MATTER_TITLE = re.compile(r"^title:[ \t]*(.+?)[ \t]*$", re.MULTILINE)


def parse_markdown(data: bytes) -> ParsedDocument:
    """Markdown's text as written, with each heading made a section break (a paragraph of its own, its #s
    dropped); the title: the front matter's `title:`, else the first heading, else the first line. YAML front
    matter is left out; lines in fenced code blocks are never headings."""
    text = decode_text(data)
    title = None
    front = FRONT_MATTER.match(text)
    if front:
        named = FRONT_MATTER_TITLE.search(front.group(1))
        title = named.group(1).strip("\"'") if named else None
        text = text[front.end() :]
    out: list[str] = []
    fence = None
    for line in text.split("\n"):
        opened = FENCE.match(line)
        if fence is not None:
            fence = None if opened and opened.group(1) == fence else fence
            out.append(line)
            continue
        if opened:
            fence = opened.group(1)
            out.append(line)
            continue
        heading = ATX_HEADING.fullmatch(line)
        if heading is None and SETEXT_UNDERLINE.fullmatch(line) and out and out[-1].strip():
            heading_text = out.pop().strip()
        elif heading is not None:
            heading_text = (heading.group(2) or "").strip()
        else:
            out.append(line)
            continue
        title = title or heading_text or None
        out += ["", heading_text, ""]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")
    return ParsedDocument(body, (title or first_line(body) or "")[:TITLE_CHARS] or None, [])


def parse_html(data: bytes) -> ParsedDocument:
    """The page's main text by trafilatura (navigation, headers, footers, asides, scripts, styles and comments
    left out; tables kept), the title from <title> (else trafilatura's)."""
    import trafilatura

    tree = trafilatura.load_html(data)
    if tree is None:
        raise Unreadable(DAMAGED, "not HTML that can be parsed")
    title = " ".join((tree.findtext(".//title") or "").split())[:TITLE_CHARS] or None
    extracted = trafilatura.bare_extraction(
        tree, include_comments=False, include_tables=True, favor_recall=True, with_metadata=False
    )
    text = normalized_newlines(extracted.text or "") if extracted is not None else ""
    return ParsedDocument(text, title or (extracted.title if extracted is not None else None), [])


# PDFium's text holds \r\n line ends, U+FFFE where a word was hyphenated at a line end and U+0002 for other soft
# hyphens; a page's text is kept otherwise as PDFium gives it
PDF_SOFT_HYPHENS = str.maketrans({"\ufffe": "-", "\x02": "-"})


def parse_pdf(data: bytes) -> ParsedDocument:
    """The text of every page (PDFium's text layer; no OCR) joined with PAGE_BREAK, where each page starts in
    it (a page's start is where the break before it starts, so a passage that begins in the break is on the
    page after it), and the title from the document's metadata, else its first line."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise Unreadable(ENCRYPTED, "encrypted with a password; decrypt it to index it") from None
        raise Unreadable(DAMAGED, str(exc)) from None
    try:
        parts: list[str] = []
        starts: list[int] = []
        length = 0
        for number in range(len(pdf)):
            page = pdf[number]
            textpage = page.get_textpage()
            text = normalized_newlines(textpage.get_text_range()).translate(PDF_SOFT_HYPHENS)
            textpage.close()
            page.close()
            starts.append(length)
            parts.append(text)
            length += (len(PAGE_BREAK) if number else 0) + len(text)
        text = PAGE_BREAK.join(parts)
        title = " ".join((pdf.get_metadata_dict(skip_empty=True).get("Title") or "").split())[:TITLE_CHARS]
    finally:
        pdf.close()
    return ParsedDocument(text, title or first_line(text), starts)


PARSERS = {"pdf": parse_pdf, "html": parse_html, "markdown": parse_markdown, "text": parse_text}


def passage_pages(page_starts: list[list[int]], passages: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each passage's page (1-based: the page holding its first character, so the first of two it spans), 0
    where its document has no pages. page_starts and passages: per document; starts: per passage, in order."""
    pages = np.zeros(len(starts), np.int64)
    first = 0
    for document_starts, count in zip(page_starts, passages.tolist()):
        if document_starts:
            pages[first : first + count] = np.searchsorted(document_starts, starts[first : first + count], "right")
        first += count
    return pages
