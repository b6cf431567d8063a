"""Folders of files (docs/build.md, "Folders of files"): PDF, HTML, Markdown and text files, each a document,
parsed by text/files.py from real files written here (the PDFs by fpdf2, a real PDF writer); a PDF's passages
know their page, and a hit carries it; files that cannot be parsed are skipped, counted and listed; a reindex
re-encodes a changed file, drops a deleted one and reuses the rest, a touched one included."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from rayindex.api import reindex
from rayindex.builder import build
from rayindex.cli import app, console
from rayindex.config import BuildConfig
from rayindex.errors import RayIndexError
from rayindex.manifest import Piece
from rayindex.query.search import open_index
from rayindex.text import corpus, files
from rayindex.text.documents import EMPTY_TEXT, prepare, with_pages

# A sentence per page, each on its own subject, in the middle of a page of filler: the passages that hold it
# start on its page (a page is about three passages of the default 256 tokens, the sentence about 1.5 in)
PAGE_SENTENCES = [
    "The lighthouse keeper writes down the wind speed every morning at dawn.",
    "Sourdough bread rises because a starter culture of wild yeast ferments the flour.",
    "The submarine cable between Lisbon and Fortaleza carries internet traffic under the Atlantic Ocean.",
    "Violin strings are tuned in perfect fifths: G, D, A and E.",
]
FILLER = "Filler sentence number {} on page {} of the report says nothing in particular."
HTML = """<!doctype html>
<html><head><title>Tidal Power Notes</title><style>.menu {{ color: red; }}</style>
<script>var trackingPixel = "zebra-umbrella-seven";</script></head>
<body>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/quokka">Quokka navigation menu</a></li>
<li><a href="/about">About the quokka site</a></li></ul></nav></header>
<main><article>
<h1>Tidal power</h1>
{paragraphs}
</article></main>
<aside>Sidebar: subscribe to the quokka newsletter for more.</aside>
<footer><p>Copyright footer with marmalade recipes and a quokka.</p></footer>
</body></html>"""
TIDAL = [
    "Tidal power stations turn the rise and fall of the sea into electricity with turbines in a barrage.",
    "The barrage across the estuary holds the high tide back and lets it run out through the turbines.",
    "The output of a tidal station is predictable years ahead, because the tides follow the moon.",
]
MARKDOWN = """---
layout: page
---
# Beekeeping basics

Bees need a dry hive and a source of water nearby.

## Swarming
A colony swarms in spring when the hive is crowded.

```bash
# not a heading: a comment in a code block
```

Winter care
-----------
Leave enough honey for the colony to eat until March.
"""


def write_pdf(path: Path, pages: list[str], title: str | None = None, password: str | None = None) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=7)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 3.5, text)
    if password:
        pdf.set_encryption(owner_password="owner-" + password, user_password=password)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(pdf.output()))
    return path


def report_pages() -> list[str]:
    """Four pages of filler, each with its PAGE_SENTENCES sentence after its 30th filler sentence."""
    pages = []
    for number, sentence in enumerate(PAGE_SENTENCES, 1):
        filler = [FILLER.format(i, number) for i in range(60)]
        pages.append(" ".join(filler[:30] + [sentence] + filler[30:]))
    return pages


def html_page() -> str:
    return HTML.format(paragraphs="\n".join(f"<p>{p}</p>" for p in TIDAL))


def write_good_files(folder: Path) -> None:
    write_pdf(folder / "report.pdf", report_pages(), title="Field Report")
    (folder / "web" / "tidal.html").parent.mkdir(parents=True, exist_ok=True)
    (folder / "web" / "tidal.html").write_text(html_page())
    (folder / "notes.md").write_text(MARKDOWN)
    (folder / "readme.txt").write_text("Readme\n\nThe archive holds field notes about coastal weather stations.\n")


def write_bad_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    good = write_pdf(folder / "whole.pdf", ["A page that will be cut short."]).read_bytes()
    (folder / "whole.pdf").unlink()
    (folder / "damaged.pdf").write_bytes(good[: len(good) // 3])
    write_pdf(folder / "locked.pdf", ["A secret page."], password="secret")
    (folder / "junk.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "empty.md").write_bytes(b"")


# --- parsing (fast) ---


def test_a_pdf_keeps_its_pages_text_and_title(tmp_path):
    parsed = files.parse_document(write_pdf(tmp_path / "r.pdf", report_pages(), "Field Report").read_bytes(), "pdf")
    assert parsed.title == "Field Report"
    assert len(parsed.page_starts) == 4 and parsed.page_starts[0] == 0
    ends = parsed.page_starts[1:] + [len(parsed.text)]
    for number, (start, end) in enumerate(zip(parsed.page_starts, ends), 1):
        page = " ".join(parsed.text[start:end].split())
        assert PAGE_SENTENCES[number - 1] in page
        assert page.startswith(FILLER.format(0, number))  # the break before a page counts as that page's
        assert all(s not in page for s in PAGE_SENTENCES if s != PAGE_SENTENCES[number - 1])
    untitled = files.parse_document(write_pdf(tmp_path / "u.pdf", ["First line here\nsecond"]).read_bytes(), "pdf")
    assert untitled.title == "First line here"


def test_a_passage_is_on_the_page_of_its_first_character():
    page_starts = [[0, 100, 250], [], [0, 10, 10, 40]]  # the third document's page 2 is empty
    passages = np.array([3, 2, 3])
    starts = np.array([0, 99, 100, 0, 50, 5, 10, 45])
    assert files.passage_pages(page_starts, passages, starts).tolist() == [1, 1, 2, 0, 0, 1, 3, 4]


def test_an_encrypted_or_damaged_pdf_is_unreadable_with_its_reason(tmp_path):
    write_bad_files(tmp_path)
    for name, fmt, reason in [
        ("damaged.pdf", "pdf", files.DAMAGED),
        ("locked.pdf", "pdf", files.ENCRYPTED),
        ("junk.txt", "text", files.NOT_TEXT),
        ("empty.md", "markdown", files.EMPTY_FILE),
    ]:
        with pytest.raises(files.Unreadable) as caught:
            files.parse_document((tmp_path / name).read_bytes(), fmt)
        assert caught.value.reason == reason, (name, caught.value)
    with pytest.raises(files.Unreadable, match="not UTF-8"):
        files.parse_document("café".encode("latin-1"), "markdown")
    with pytest.raises(files.Unreadable, match="NUL byte at offset 3"):
        files.parse_document(b"abc\x00def", "text")
    with pytest.raises(files.Unreadable, match=files.NO_TEXT):
        files.parse_document(write_pdf(tmp_path / "blank.pdf", [""]).read_bytes(), "pdf")
    from fpdf import FPDF

    owner_only = FPDF()  # encrypted, with an owner password only: it opens without one, and is read
    owner_only.set_font("helvetica", size=12)
    owner_only.add_page()
    owner_only.multi_cell(0, 10, "Printing is restricted, reading is not.")
    owner_only.set_encryption(owner_password="owner")
    assert "reading is not" in files.parse_document(bytes(owner_only.output()), "pdf").text


def test_text_files_in_utf8_or_utf16_with_a_bom():
    assert files.parse_document("\ufeffTitle line\r\nbody".encode(), "text") == ("Title line\nbody", "Title line", [])
    assert files.parse_document("Übersicht\nText".encode("utf-16"), "text").text == "Übersicht\nText"


def test_html_main_text_without_navigation_scripts_styles_or_footer():
    parsed = files.parse_document(html_page().encode(), "html")
    assert parsed.title == "Tidal Power Notes"
    for paragraph in TIDAL:
        assert paragraph in parsed.text
    for boilerplate in ("quokka", "Quokka", "zebra-umbrella", "marmalade", "color: red", "Home"):
        assert boilerplate not in parsed.text, boilerplate


def test_markdown_headings_are_section_breaks_and_the_first_is_the_title():
    parsed = files.parse_document(MARKDOWN.encode(), "markdown")
    assert parsed.title == "Beekeeping basics"
    assert parsed.text.split("\n\n")[:4] == [
        "Beekeeping basics",
        "Bees need a dry hive and a source of water nearby.",
        "Swarming",
        "A colony swarms in spring when the hive is crowded.",
    ]
    assert "# not a heading: a comment in a code block" in parsed.text  # fenced code kept as written
    assert (
        "Winter care\n\nLeave enough honey" in parsed.text and "---" not in parsed.text and "layout" not in parsed.text
    )
    titled = files.parse_document(b"---\ntitle: 'From the front matter'\n---\n# Heading\ntext", "markdown")
    assert titled.title == "From the front matter"


# --- listing and reading (fast, no Ray) ---


def test_a_folder_of_files_is_listed_with_ids_under_it(tmp_path):
    folder = tmp_path / "corpus"
    write_good_files(folder)
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "skip.md").write_text("# hidden")
    (folder / "image.png").write_bytes(b"\x89PNG")
    names = corpus.input_files([str(folder)])
    assert sorted(names.values()) == ["notes.md", "readme.txt", "report.pdf", "web/tidal.html"]
    assert corpus.input_files([str(folder / "web" / "tidal.html")]) == {
        str(folder / "web" / "tidal.html"): "tidal.html"
    }
    assert sorted(corpus.input_files([str(folder / "*" / "*.html")]).values()) == ["web/tidal.html"]
    assert corpus.duplicate_names(names) is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("# other notes")
    clash = corpus.duplicate_names(corpus.input_files([str(folder), str(tmp_path / "other")]))
    assert "the same id 'notes.md'" in clash and "common parent folder" in clash


def test_files_become_documents_named_by_path_with_metadata_and_skips_counted(tmp_path):
    folder = tmp_path / "corpus"
    write_good_files(folder)
    write_bad_files(folder / "bad")
    names = corpus.input_files([str(folder)])
    pieces = [
        Piece(path=p, row_start=0, num_rows=1, global_start=i, doc_id=names[p]) for i, p in enumerate(sorted(names))
    ]
    ((batch, where),) = corpus.read_pieces(pieces)  # one batch: every file
    docs = prepare(batch, ["ignored"], "{ignored}", "ignored", where, max_chars=100_000)
    assert docs.doc_ids.to_pylist() == ["notes.md", "readme.txt", "report.pdf", "web/tidal.html"]
    assert docs.doc_id_is_int.to_pylist() == [False] * 4
    metadata = [json.loads(m) for m in docs.metadata.to_pylist()]
    assert [(m["format"], m["title"], m["pages"]) for m in metadata] == [
        ("markdown", "Beekeeping basics", None),
        ("text", "Readme", None),
        ("pdf", "Field Report", 4),
        ("html", "Tidal Power Notes", None),
    ]
    assert metadata[2]["path"] == str(folder / "report.pdf")
    assert metadata[2]["bytes"] == (folder / "report.pdf").stat().st_size and metadata[2]["mtime"].endswith("+00:00")
    assert [len(p) for p in docs.page_starts] == [0, 0, 4, 0]
    assert docs.skipped == {files.DAMAGED: 1, files.ENCRYPTED: 1, files.NOT_TEXT: 1, files.EMPTY_FILE: 1}
    assert EMPTY_TEXT not in docs.skipped
    assert sorted((Path(f.path).name, f.reason) for f in docs.skipped_files) == [
        ("damaged.pdf", files.DAMAGED),
        ("empty.md", files.EMPTY_FILE),
        ("junk.txt", files.NOT_TEXT),
        ("locked.pdf", files.ENCRYPTED),
    ]

    # a file over --max-file-bytes is skipped unread; a touched or moved file keeps its content hash
    (big,) = [p for p in pieces if p.path.endswith("report.pdf")]
    ((batch, where),) = corpus.read_pieces([big], max_file_bytes=1000)
    assert prepare(batch, ["text"], None, None, where).skipped == {files.TOO_BIG: 1}
    os.utime(big.path, (1, 1))
    ((again, where),) = corpus.read_pieces(pieces)
    touched = prepare(again, ["text"], None, None, where, max_chars=100_000)
    assert touched.content_hashes.tolist() == docs.content_hashes.tolist()
    assert json.loads(touched.metadata[2].as_py())["mtime"] == "1970-01-01T00:00:01+00:00"


def test_passage_metadata_gets_its_page():
    metadata = pa.array(['{"path":"a.pdf"}', '{"path":"a.pdf"}', "{}", '{"x":1}'])
    assert with_pages(metadata, np.array([2, 3, 1, 0])).to_pylist() == [
        '{"path":"a.pdf","page":2}',
        '{"path":"a.pdf","page":3}',
        '{"page":1}',
        '{"x":1}',
    ]


# --- a real build (slow) ---


@pytest.fixture(scope="module")
def folder_build(ray_address, tmp_path_factory):
    """`rayindex build DIR -o OUT` and nothing else, over a folder of good and bad files."""
    root = tmp_path_factory.mktemp("files")
    write_good_files(root / "corpus")
    write_bad_files(root / "corpus" / "bad")
    result = CliRunner().invoke(app, ["build", str(root / "corpus"), "-o", str(root / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.mark.slow
def test_a_folder_builds_and_a_pdf_hit_names_its_page(folder_build, monkeypatch):
    root, output = folder_build
    index = open_index(root / "out")
    counts = index.manifest.counts
    assert counts.docs_encoded == 4
    assert counts.skipped == {files.DAMAGED: 1, files.ENCRYPTED: 1, files.NOT_TEXT: 1, files.EMPTY_FILE: 1}
    listed = {Path(f.path).name: f.reason for s in index.manifest.shard_states for f in s.skipped_files}
    assert listed == {
        "damaged.pdf": files.DAMAGED,
        "locked.pdf": files.ENCRYPTED,
        "junk.txt": files.NOT_TEXT,
        "empty.md": files.EMPTY_FILE,
    }
    assert "4 file(s) could not be indexed" in " ".join(output.split())

    for number, sentence in enumerate(PAGE_SENTENCES, 1):
        best = index.search(sentence, k=1)[0]
        assert (best["id"], best["page"]) == ("report.pdf", number), (sentence, best)
        assert best["metadata"]["page"] == number and best["metadata"]["pages"] == 4
    on_page_3 = index.search(PAGE_SENTENCES[0], k=1, filter={"page": 3})[0]  # page 1's sentence, page 3 only
    assert (on_page_3["id"], on_page_3["page"]) == ("report.pdf", 3)
    answer = index.ask(PAGE_SENTENCES[2], k=2)
    assert answer["sources"][0]["id"] == "report.pdf" and answer["sources"][0]["page"] == 3
    tidal = index.search("electricity from the tides", k=1)[0]
    assert tidal["id"] == "web/tidal.html" and "page" not in tidal
    html_texts = [t for shard in index.docs.column("text") for t in shard[1].to_pylist()]
    assert any("Tidal power stations" in t for t in html_texts)
    assert not any("quokka" in t.lower() or "zebra-umbrella" in t for t in html_texts)

    monkeypatch.setattr(console, "width", 200)  # the table's id cell unfolded
    table = CliRunner().invoke(app, ["search", "--index", str(root / "out"), PAGE_SENTENCES[2], "-k", "1"])
    assert table.exit_code == 0 and "report.pdf p. 3" in table.output, table.output


@pytest.mark.slow
def test_reindex_reencodes_a_changed_file_and_drops_a_deleted_one(folder_build):
    root, _ = folder_build
    folder = root / "corpus"
    (folder / "notes.md").write_text(MARKDOWN + "\nQueens are fed royal jelly as larvae.\n")
    (folder / "readme.txt").unlink()
    os.utime(folder / "web" / "tidal.html", (1, 1))  # touched, not changed: reused
    second = reindex(str(root / "out"), str(folder))
    assert second.reindex.model_dump(include={"added", "changed", "deleted", "unchanged", "encoded"}) == {
        "added": 0,
        "changed": 1,
        "deleted": 1,
        "unchanged": 2,
        "encoded": 1,
    }
    index = open_index(root / "out")
    assert index.search("royal jelly for queen larvae", k=1)[0]["id"] == "notes.md"
    ids = {h["id"] for h in index.search("field notes about coastal weather stations", k=10)}
    assert ids == {"report.pdf", "web/tidal.html", "notes.md"}


@pytest.mark.slow
def test_a_folder_of_only_bad_files_fails_naming_them(ray_address, tmp_path):
    write_bad_files(tmp_path / "bad")
    with pytest.raises(RayIndexError) as caught:
        build(BuildConfig(inputs=[str(tmp_path / "bad")], output=str(tmp_path / "out")))
    message = str(caught.value)
    assert "no documents to index: all 4 rows were skipped" in message
    assert "damaged.pdf (file_damaged:" in message and "files skipped:" in message and "1 more" in message


@pytest.mark.slow
def test_files_on_s3_are_named_under_the_prefix_and_parsed(s3_server, tmp_path):
    """A prefix of files on a real S3 (the suite's SeaweedFS): listed with their ids under the prefix, read and
    parsed through fsspec, the object's LastModified as mtime."""
    fs, bucket = s3_server.fs, s3_server.bucket
    fs.pipe(
        f"{bucket}/files/docs/report.pdf", write_pdf(tmp_path / "r.pdf", report_pages(), "Field Report").read_bytes()
    )
    fs.pipe(f"{bucket}/files/docs/web/tidal.html", html_page().encode())
    names = corpus.input_files([f"s3://{bucket}/files/docs"])
    assert names == {
        f"s3://{bucket}/files/docs/report.pdf": "report.pdf",
        f"s3://{bucket}/files/docs/web/tidal.html": "web/tidal.html",
    }
    pieces = [Piece(path=p, row_start=0, num_rows=1, global_start=i, doc_id=names[p]) for i, p in enumerate(names)]
    ((batch, where),) = corpus.read_pieces(pieces)
    docs = prepare(batch, ["text"], None, None, where)
    assert docs.doc_ids.to_pylist() == ["report.pdf", "web/tidal.html"] and docs.skipped == {}
    assert [len(p) for p in docs.page_starts] == [4, 0]
    metadata = [json.loads(m) for m in docs.metadata.to_pylist()]
    assert metadata[0]["path"] == f"s3://{bucket}/files/docs/report.pdf" and metadata[0]["mtime"].endswith("+00:00")
