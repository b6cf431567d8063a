"""Passages: a document longer than one passage split into overlapping windows of the model's own tokens,
each ending at a paragraph or sentence boundary where one is in its second half (else at a word start),
every character of the document inside at least one passage's character span. Plain functions on a
text's token offsets: text/model.py tokenizes, this decides where the windows fall.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

# a boundary: after a blank line (paragraph), or after a sentence's end mark and its closing quotes or
# brackets; the match's end is where the next passage may start
BREAKS = re.compile(r"\n\s*\n|(?<=[.!?;:])[\"'\u201d\u2019)\]]*\s+")


class Window(NamedTuple):
    token_start: int
    token_end: int  # exclusive
    char_start: int
    char_end: int  # exclusive


def default_overlap(size: int) -> int:
    """An eighth of the passage: a sentence cut by one window's end is whole in the next one for most prose."""
    return size // 8


def windows(
    text: str, starts: np.ndarray, ends: np.ndarray, word_start: np.ndarray, size: int, overlap: int
) -> list[Window]:
    """Token windows of at most `size` tokens over a text whose tokens span text[starts[i]:ends[i]].

    A window ends at the last paragraph or sentence boundary in its second half, else at the last word
    start in it (a word is never split between windows unless it alone is longer than half a window); the
    next window starts `overlap` tokens before that end, moved forward to a word start (so at most
    `overlap` tokens are shared). Character spans cover
    the text end to end: the first starts at 0, the last ends at len(text), and each reaches the next
    one's start, so no character (whitespace between windows included) is left out."""
    n = len(starts)
    if n <= size:
        return [Window(0, n, 0, len(text))]
    at_break = np.zeros(n + 1, bool)
    break_chars = np.fromiter((m.end() for m in BREAKS.finditer(text)), np.int64)
    if len(break_chars):
        first_token = np.searchsorted(starts, break_chars)  # the first token at or after each boundary
        at_break[first_token[first_token < n]] = True
    at_break[n] = True
    at_word = np.append(np.asarray(word_start, bool), True)
    spans, start = [], 0
    while True:
        limit = min(n, start + size)
        end = limit
        if limit < n:
            low = start + size // 2
            breaks = np.flatnonzero(at_break[low + 1 : limit + 1])
            words = np.flatnonzero(at_word[low + 1 : limit + 1]) if not len(breaks) else breaks
            end = low + 1 + int(words[-1]) if len(words) else limit
        spans.append((start, end))
        if end >= n:
            break
        back = max(start + 1, end - overlap)
        start = back + int(np.argmax(at_word[back : end + 1]))  # the first word start at or after it (end is one)
    out = []
    for i, (a, b) in enumerate(spans):
        char_start = 0 if i == 0 else int(starts[a])
        char_end = len(text) if i == len(spans) - 1 else max(int(ends[b - 1]), int(starts[spans[i + 1][0]]))
        out.append(Window(a, b, char_start, char_end))
    return out
