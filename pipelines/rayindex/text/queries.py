"""Queries as users send them, made from a passage's own text, and query files users give.

A RAG user sends short questions and key phrases ("what is a zip archive", "json decoder"), not sentences
lifted from a document: a sentence sits much closer to its passage and its neighbours than a short query
does, so an nprobe tuned on sentences alone is too small for them (measured on 11,489 GCIDE entries,
IVF256,Flat: nprobe 64, tuned on sentences, found recall@10 0.916 vs exhaustive for 300 "What is TERM?"
questions). `user_query` makes one query of a given shape from a passage:

- sentence: one of its sentences (5+ words), what tuning used before;
- title: the text's title or a heading (the first line before ": ", a Markdown/underlined/upper-case
  heading), bare, as a keyword query;
- phrase: a key phrase (RAKE: runs of content words between stopwords and punctuation, ranked by word
  degree over frequency), bare;
- question: "What is X?", "How does X work?" or "How to use X?" with X a title or key phrase.

`read_query_file` reads a JSONL file of {"query": ...} (and "id" for labelled queries), refusing a bad
line naming the file, the line and the field.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from rayindex.errors import RayIndexError

QUERY_SHAPES = ("sentence", "title", "phrase", "question")
QUESTION_FORMS = ("What is {}?", "How does {} work?", "How to use {}?")
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
PHRASE_BREAK = re.compile(r"[^\w\s'-]+|\s-+\s|\s+'|'\s+")  # punctuation ends a phrase; a hyphenated word does not
WORD = re.compile(r"[A-Za-z][\w'-]*")
MAX_TITLE_WORDS = 8
MAX_PHRASE_WORDS = 4
FALLBACK_CHARS = 200  # a passage with no sentence, title or phrase: its head


@functools.cache
def stopwords() -> frozenset[str]:
    """English stopwords: scikit-learn's list (imported when first needed: the import takes ~1 s)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def squeeze(text: str) -> str:
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    """The text's sentences (and paragraphs) of 5 words or more, whitespace squeezed."""
    return [squeeze(s) for s in SENTENCE.split(text) if len(s.split()) >= 5]


def title_words(line: str) -> str | None:
    """A line as a title: 1 to MAX_TITLE_WORDS words with a letter, Markdown marks stripped; else None."""
    line = squeeze(line.strip().lstrip("#").strip().strip("*`=").strip())  # "_" is part of names: __init__
    return line if line and 1 <= len(line.split()) <= MAX_TITLE_WORDS and re.search("[A-Za-z]", line) else None


def titles(text: str) -> list[str]:
    """The text's title and headings: its first line's head before ": " (a "{title}: {body}" document) or the
    whole first line; then lines that are Markdown headings, underlined (=== / ---), or upper case."""
    lines = text.splitlines()
    found = []
    if lines:
        head = lines[0].split(": ", 1)[0]
        found.append(title_words(head))
    for number, line in enumerate(lines[1:], 1):
        under = lines[number + 1].strip() if number + 1 < len(lines) else ""
        heading = (
            line.lstrip().startswith("#")
            or (under and set(under) <= set("=-~^") and len(under) >= 3)
            or (line.strip().isupper() and len(line.split()) <= MAX_TITLE_WORDS)
        )
        if heading:
            found.append(title_words(line))
    return list(dict.fromkeys(t for t in found if t))


def key_phrases(text: str, limit: int = 8) -> list[str]:
    """The text's best key phrases, best first (RAKE, Rose et al. 2010): candidates are runs of 1 to
    MAX_PHRASE_WORDS words split at stopwords and punctuation; a word scores its degree (the length of the
    candidates it is in) over its frequency, a phrase the sum of its words' scores. Phrases that are only a
    short word (under 4 letters) or a number are left out."""
    stop = stopwords()
    candidates = []
    for chunk in PHRASE_BREAK.split(text):
        run: list[str] = []
        for token in chunk.split() + [""]:
            word = token.strip("'-")
            if word and WORD.fullmatch(word) and word.lower() not in stop:
                run.append(word)
                continue
            if run and len(run) <= MAX_PHRASE_WORDS and (len(run) > 1 or len(run[0]) >= 4):
                candidates.append(tuple(run))
            run = []
    frequency: dict[str, int] = {}
    degree: dict[str, int] = {}
    for phrase in candidates:
        for word in phrase:
            lower = word.lower()
            frequency[lower] = frequency.get(lower, 0) + 1
            degree[lower] = degree.get(lower, 0) + len(phrase)
    scored = {" ".join(phrase): sum(degree[w.lower()] / frequency[w.lower()] for w in phrase) for phrase in candidates}
    return sorted(scored, key=lambda p: -scored[p])[:limit]


def user_query(text: str, shape: str, rng: np.random.Generator) -> str:
    """One query of this shape (QUERY_SHAPES) made from the text; a shape the text cannot give falls back to
    the next one that it can (title -> phrase -> sentence -> the text's head)."""
    if shape not in QUERY_SHAPES:
        raise ValueError(f"query shape {shape!r}: use one of {', '.join(QUERY_SHAPES)}")
    named = titles(text)
    phrases = key_phrases(text)
    said = sentences(text)
    pick = {
        "sentence": said,
        "title": named or phrases,
        "phrase": phrases or named,
        "question": named + phrases[:2],
    }[shape] or said
    if not pick:
        return squeeze(text[:FALLBACK_CHARS])
    chosen = pick[rng.integers(len(pick))]
    if shape == "question" and (named or phrases):
        return QUESTION_FORMS[rng.integers(len(QUESTION_FORMS))].format(chosen)
    return chosen


def read_query_file(path: str | Path, labelled: bool = False) -> list[dict]:
    """A JSONL file of {"query": text} objects ({"query", "id"} when labelled); other fields are kept.
    A line that is not such an object is refused naming the file, the line and the field; blank lines are
    skipped; an empty file is refused."""
    fields = ("query", "id") if labelled else ("query",)
    shape = "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RayIndexError(f"--queries {path}: cannot read it ({exc})") from None
    items = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RayIndexError(f"{path} line {line_no}: not valid JSON ({exc.msg}); expected {shape}") from None
        if not isinstance(item, dict):
            raise RayIndexError(f"{path} line {line_no}: expected a JSON object {shape}")
        for field in fields:
            if field not in item:
                raise RayIndexError(f'{path} line {line_no}: no "{field}" field; expected {shape}')
        if not isinstance(item["query"], str) or not item["query"].strip():
            raise RayIndexError(f'{path} line {line_no}: field "query" must be a non-empty string')
        items.append(item)
    if not items:
        raise RayIndexError(f"{path}: no queries (expected JSON lines {shape})")
    return items
