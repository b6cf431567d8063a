"""Text to index terms, the same way for passages and queries.

Technical text names things: `ray.init`, `--no-tune`, `EINVAL`, `IndexIVFPQ`, `x86_64`. A word analyzer
(split on punctuation, stem) loses them: `ray.init` becomes `ray` and `init`, each common. So a token made
of several parts (joined by `.`, `_`, `-`, `:`, `/`, `@`, or in camelCase) is indexed as written (casefolded,
unstemmed) *and* by its parts (each stemmed, stopwords dropped): a query that writes the identifier matches
it exactly, a query that names a part still finds it. A plain word is casefolded, dropped if a stopword and
stemmed (Snowball, through PyStemmer). The stopword lists are bm25s's (Lucene's 33 English words, the same
list as Elasticsearch's `english` analyzer, and its lists for other languages).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

# a word, or words joined by connectors; a leading - or -- is kept when it starts the token (a flag)
RAW_TOKEN = re.compile(r"(?<![\w-])-{1,2}(?=\w)\w+(?:[._\-:/@]+\w+)*|\w+(?:[._\-:/@]+\w+)*")
CONNECTORS = re.compile(r"[._\-:/@]+")
CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class AnalyzerSettings(NamedTuple):
    """What the index was analyzed with; a query must be analyzed the same way (recorded in the index)."""

    language: str | None = "english"  # Snowball stemmer and stopword list; None: neither
    stopwords: bool = True


def languages() -> list[str]:
    """The languages a lexical index can be built for: PyStemmer's Snowball stemmers."""
    import Stemmer

    return sorted(Stemmer.algorithms())


def stopword_list(language: str | None) -> frozenset[str]:
    """bm25s's stopwords for language (empty for a language it has no list for)."""
    if language is None:
        return frozenset()
    from bm25s import stopwords

    name = "STOPWORDS_EN" if language in ("english", "porter") else f"STOPWORDS_{language.upper()}"
    return frozenset(getattr(stopwords, name, ()))


def parts(token: str) -> list[str]:
    """The parts of a raw token: split at connectors and camelCase boundaries (`IndexIVFPQ` -> Index, IVFPQ;
    `x86_64` -> x86, 64; `--no-tune` -> no, tune)."""
    return [p for piece in CONNECTORS.split(token) if piece for p in CAMEL_BOUNDARY.split(piece) if p]


class Analyzer:
    """analyze(text) -> the terms to index or to look up, in order (repeats kept: they are term counts)."""

    def __init__(self, settings: AnalyzerSettings | None = None):
        self.settings = settings = settings or AnalyzerSettings()
        self.stopwords = stopword_list(settings.language) if settings.stopwords else frozenset()
        if settings.language is None:
            self.stem = str
        else:
            import Stemmer

            if settings.language not in Stemmer.algorithms():
                raise ValueError(f"no Snowball stemmer for language {settings.language!r}: choose one of {languages()}")
            self.stem = lru_cache(maxsize=1 << 18)(Stemmer.Stemmer(settings.language).stemWord)

    def words(self, pieces: list[str]) -> list[str]:
        """Casefolded pieces, stopwords dropped, stemmed."""
        folded = (p.casefold() for p in pieces)
        return [self.stem(w) for w in folded if w not in self.stopwords]

    def analyze(self, text: str) -> list[str]:
        terms: list[str] = []
        for raw in RAW_TOKEN.findall(text):
            split = parts(raw)
            if len(split) > 1 or raw.startswith("-"):
                terms.append(raw.casefold())  # as written: the identifier itself
            terms.extend(self.words(split))
        return terms
