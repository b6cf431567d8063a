"""Queries as users send them (text/queries.py): titles and headings, key phrases, the shapes made from a
passage, and query files refused line by line."""

import json

import numpy as np
import pytest

from rayindex.errors import RayIndexError
from rayindex.text.queries import QUERY_SHAPES, key_phrases, read_query_file, sentences, titles, user_query

DOC = """json.loads: Deserialize a JSON document to a Python object.

Usage
=====

The decoder accepts strict input, and the object hook turns every decoded mapping into a custom class.

## Error handling

A malformed document raises JSONDecodeError with the position of the problem.
"""


def test_titles_are_the_documents_head_and_its_headings():
    assert titles(DOC) == ["json.loads", "Usage", "Error handling"]
    assert titles("NAME\n\nls - list directory contents\n\nDESCRIPTION\nList information.") == ["NAME", "DESCRIPTION"]
    assert titles("__init__: Initialize self.") == ["__init__"]  # underscores are part of a name
    assert titles("A first line that is a long sentence rather than any kind of title at all.") == []


def test_key_phrases_are_runs_of_content_words_ranked_by_degree():
    phrases = key_phrases("The object hook turns every decoded mapping into a custom class. The object hook is slow.")
    # candidates (split at stopwords and the period): object hook turns, decoded mapping, custom class, object
    # hook, slow; degree/frequency: object and hook (3 + 2) / 2, turns 3, decoded, mapping, custom, class 2, slow 1
    assert phrases == ["object hook turns", "object hook", "decoded mapping", "custom class", "slow"]  # 8, 5, 4, 4, 1
    assert key_phrases("It is a an the of.") == []
    assert "malformed document raises JSONDecodeError" in key_phrases(DOC, limit=20)


def test_user_query_makes_each_shape_from_the_text_and_falls_back():
    rng = np.random.default_rng(0)
    made = {shape: user_query(DOC, shape, rng) for shape in QUERY_SHAPES}
    assert made["sentence"] in sentences(DOC)
    assert made["title"] in titles(DOC)
    assert made["phrase"] in key_phrases(DOC)
    assert made["question"].endswith("?") and len(made["question"].split()) <= 12
    # no title (a first line of 9+ words) nor heading: a key phrase; no sentence of 5 words either: the text's head
    long_line = "It takes a decoded mapping and returns a custom class for all of them"
    assert user_query(long_line, "title", rng) in {"decoded mapping", "custom class"}
    assert user_query("of the a", "sentence", rng) == "of the a"
    with pytest.raises(ValueError, match="query shape 'poem'"):
        user_query(DOC, "poem", rng)
    again = np.random.default_rng(0)
    assert [user_query(DOC, shape, again) for shape in QUERY_SHAPES] == list(made.values())  # seeded: repeatable


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"query": "ok"}\nnot json\n', "q.jsonl line 2: not valid JSON"),
        ('{"query": "ok"}\n\n[1, 2]\n', "q.jsonl line 3: expected a JSON object"),
        ('{"text": "no query"}\n', 'q.jsonl line 1: no "query" field'),
        ('{"query": 7}\n', 'q.jsonl line 1: field "query" must be a non-empty string'),
        ('{"query": "   "}\n', 'q.jsonl line 1: field "query" must be a non-empty string'),
        ("\n\n", "q.jsonl: no queries"),
    ],
)
def test_query_files_are_refused_naming_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(RayIndexError, match=message):
        read_query_file(path)


def test_query_files_read_with_or_without_labels(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in ({"query": "a b", "n": 1}, {"query": "c", "id": 3})))
    assert read_query_file(path) == [{"query": "a b", "n": 1}, {"query": "c", "id": 3}]
    with pytest.raises(RayIndexError, match='line 1: no "id" field'):
        read_query_file(path, labelled=True)
    with pytest.raises(RayIndexError, match="--queries .*missing.jsonl: cannot read it"):
        read_query_file(tmp_path / "missing.jsonl")
