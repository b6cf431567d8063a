"""Answer generators: the extractive one with the real packaged embedding model, the OpenAI client
against a small local server speaking the same API (no LLM runs offline), and the transformers one
with tiny random-weight models built and saved here (no downloads)."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from pydantic import ValidationError

from rayindex.config import GeneratorConfig
from rayindex.query.generate import (
    PROMPT_TEMPLATE,
    ExtractiveGenerator,
    GeneratorError,
    OpenAIGenerator,
    TransformersGenerator,
    build_prompt,
    chat_completions_url,
    make_generator,
)

PASSAGES = [
    {
        "id": "eiffel",
        "score": 0.71,
        "metadata": {"kind": "landmark"},
        "text": "The Eiffel Tower stands on the Champ de Mars in Paris. Construction of the Eiffel Tower was finished "
        "in 1889 for the World's Fair.",
    },
    {
        "id": "photo",
        "score": 0.64,
        "metadata": {"kind": "biology"},
        "text": "Photosynthesis converts light energy into chemical energy in green plants. "
        "Chlorophyll absorbs mostly blue and red light.",
    },
    {
        "id": "python",
        "score": 0.58,
        "metadata": {"kind": "software"},
        "text": "Python is a programming language created by Guido van Rossum. Its first version was released in 1991.",
    },
]
QUESTION = "Who created the Python programming language?"
ANSWER_SENTENCE = "Python is a programming language created by Guido van Rossum."


# --------------------------------------------------------------------------------------------
# build_prompt


def test_build_prompt_numbers_passages_and_asks_for_citations():
    prompt = build_prompt(QUESTION, PASSAGES)
    for number, passage in enumerate(PASSAGES, start=1):
        assert f"[{number}] {passage['text']}" in prompt
    assert "[4]" not in prompt
    assert QUESTION in prompt
    assert "only" in prompt and "like [1]" in prompt  # answer only from the passages, cite them
    assert prompt.index("[3]") < prompt.index(QUESTION)  # question last: causal models continue from it


def test_build_prompt_custom_template_and_braces_in_text():
    passages = [{"id": 1, "score": 1.0, "text": "dict literals look like {'a': 1} {x}", "metadata": {}}]
    assert (
        build_prompt("q?", passages, template="{question}|{context}")
        == "q?|<passage n=\"1\">\n[1] dict literals look like {'a': 1} {x}\n</passage>"
    )
    assert "{context}" in PROMPT_TEMPLATE and "{question}" in PROMPT_TEMPLATE


# --------------------------------------------------------------------------------------------
# Extractive, with the real embedding model


@pytest.fixture(scope="module")
def encode():
    from rayindex.text.model import load_model

    model = load_model("all-MiniLM-L6-v2")
    return lambda texts: model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def test_extractive_answers_with_the_right_sentence_and_citation(encode):
    answer = ExtractiveGenerator(encode).generate(QUESTION, PASSAGES)
    # The answering sentence leads, cited with the number of the passage it came from.
    assert answer.startswith(f"{ANSWER_SENTENCE} [3]")
    assert "[" in answer and answer.count("[") <= 3  # at most max_sentences citations

    only = ExtractiveGenerator(encode, max_sentences=1).generate(QUESTION, PASSAGES)
    assert only == f"{ANSWER_SENTENCE} [3]"


def test_extractive_picks_per_question(encode):
    generator = ExtractiveGenerator(encode, max_sentences=1)
    assert (
        generator.generate("When was the Eiffel Tower completed?", PASSAGES)
        == "Construction of the Eiffel Tower was finished in 1889 for the World's Fair. [1]"
    )
    assert (
        generator.generate("Which pigment absorbs light in plants?", PASSAGES)
        == "Chlorophyll absorbs mostly blue and red light. [2]"
    )


def test_extractive_keeps_sentences_of_one_passage_in_source_order(encode):
    passages = [
        {
            "id": "a",
            "score": 1.0,
            "metadata": {},
            "text": "Guido van Rossum began working on Python in 1989. He named the Python language after "
            "Monty Python. Python 3.0 was released in 2008.",
        }
    ]
    answer = ExtractiveGenerator(encode, max_sentences=2).generate("Who created the Python language?", passages)
    sentences = [s for s in answer.split(" [1]") if s.strip()]
    assert len(sentences) == 2
    text = passages[0]["text"]
    assert text.index(sentences[0].strip()) < text.index(sentences[1].strip())


def test_extractive_skips_short_fragments_and_handles_empty(encode):
    generator = ExtractiveGenerator(encode, max_sentences=3)
    passages = [
        {"id": "x", "score": 1.0, "metadata": {}, "text": "See also. Ok. " + ANSWER_SENTENCE},
        {"id": "y", "score": 0.5, "metadata": {}, "text": None},
    ]
    answer = generator.generate(QUESTION, passages)
    assert answer == f"{ANSWER_SENTENCE} [1]"  # "See also." and "Ok." are too short to be candidates

    for empty in ([], [{"id": "z", "score": 0.1, "metadata": {}, "text": "   "}]):
        no_answer = generator.generate(QUESTION, empty)
        assert "No relevant passages were found" in no_answer
        assert "[" not in no_answer


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint: a local stand-in server


class ChatHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions; behaviour chosen by server.mode: ok | slow | error | garbage."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server = self.server
        server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path != "/v1/chat/completions":
            return self.reply(404, b'{"error": "not found"}')
        if server.mode == "slow":
            server.release.wait(timeout=2.0)  # released at teardown, so shutdown never waits 2 s
            return self.reply(200, json.dumps(completion("too late")).encode())
        if server.mode == "error":
            return self.reply(500, b'{"error": {"message": "CUDA out of memory while loading the model"}}')
        if server.mode == "garbage":
            return self.reply(200, b"<html>proxy login</html>")
        request = json.loads(body)
        return self.reply(
            200, json.dumps(completion(f"Guido van Rossum created it [3]. model={request['model']}")).encode()
        )

    def reply(self, status: int, payload: bytes):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test): nothing to answer to

    def log_message(self, *args):
        pass


def completion(content: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "tiny",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    server.daemon_threads = True
    server.mode = "ok"
    server.requests = []
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_openai_success_sends_prompt_model_and_key(chat_server):
    generator = OpenAIGenerator(base_url(chat_server), "tiny-llm", api_key="sk-test", timeout_s=5)
    assert generator.generate(QUESTION, PASSAGES) == "Guido van Rossum created it [3]. model=tiny-llm"

    (request,) = chat_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    body = json.loads(request["body"])
    assert body["model"] == "tiny-llm" and body["temperature"] == 0 and body["max_tokens"] == 512
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user"]
    user = body["messages"][1]["content"]
    assert QUESTION in user
    assert all(f"[{i}] {p['text']}" in user for i, p in enumerate(PASSAGES, start=1))


def test_openai_base_url_with_or_without_v1(chat_server):
    root = base_url(chat_server)
    for url in (root, root + "/", root + "/v1", root + "/v1/"):
        assert OpenAIGenerator(url, "m", timeout_s=5).generate(QUESTION, PASSAGES).startswith("Guido")
    assert [r["path"] for r in chat_server.requests] == ["/v1/chat/completions"] * 4
    assert "Authorization" not in chat_server.requests[0]["headers"]  # no key, no header
    assert chat_completions_url("https://api.example.com/v1") == "https://api.example.com/v1/chat/completions"


def test_openai_timeout_is_504(chat_server):
    chat_server.mode = "slow"
    url = base_url(chat_server)
    with pytest.raises(GeneratorError) as info:
        OpenAIGenerator(url, "m", timeout_s=0.5).generate(QUESTION, PASSAGES)
    assert info.value.status_code == 504
    assert f"{url}/v1/chat/completions" in str(info.value) and "0.5 s" in str(info.value)


def test_openai_server_error_is_502(chat_server):
    chat_server.mode = "error"
    with pytest.raises(GeneratorError) as info:
        OpenAIGenerator(base_url(chat_server), "m", timeout_s=5).generate(QUESTION, PASSAGES)
    assert info.value.status_code == 502
    assert "500" in str(info.value) and "CUDA out of memory" in str(info.value)


def test_openai_malformed_response_is_502(chat_server):
    chat_server.mode = "garbage"
    with pytest.raises(GeneratorError) as info:
        OpenAIGenerator(base_url(chat_server), "m", timeout_s=5).generate(QUESTION, PASSAGES)
    assert info.value.status_code == 502 and "proxy login" in str(info.value)


def test_openai_connection_refused_is_502():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(GeneratorError) as info:
        OpenAIGenerator(f"http://127.0.0.1:{port}", "m", timeout_s=5).generate(QUESTION, PASSAGES)
    assert info.value.status_code == 502
    assert f"127.0.0.1:{port}" in str(info.value)


# --------------------------------------------------------------------------------------------
# Local transformers models: tiny, random weights, built here


VOCAB_TEXT = [build_prompt(QUESTION, PASSAGES), "tokyo kyoto osaka"]


def save_tiny_tokenizer(directory) -> object:
    """A word-level tokenizer trained on the test's own text, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Special tokens first, so ids are pad=0, eos=1, unk=2 (T5's own convention for pad/eos).
    tok.train_from_iterator(VOCAB_TEXT, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = save_tiny_tokenizer(directory)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT-2 (64 positions) whose every next token is "tokyo", a word that is not in the prompt:
    the final layer norm is made to output a constant vector that only tokyo's (tied) embedding matches."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = save_tiny_tokenizer(directory)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    model = GPT2LMHeadModel(config)
    target = tokenizer.convert_tokens_to_ids("tokyo")
    with torch.no_grad():
        direction = torch.zeros(config.n_embd)
        direction[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[target] = 100 * direction  # tied with lm_head: logit 100 vs ~0.02
    model.save_pretrained(directory)
    return directory


def test_transformers_seq2seq_generates_text(tiny_t5):
    generator = TransformersGenerator(str(tiny_t5), max_new_tokens=8)
    assert generator.is_encoder_decoder
    answer = generator.generate(QUESTION, PASSAGES)
    assert isinstance(answer, str)
    assert len(answer.split()) <= 8


def test_transformers_causal_returns_only_new_tokens(tiny_gpt2):
    generator = TransformersGenerator(str(tiny_gpt2), max_new_tokens=8)
    assert not generator.is_encoder_decoder
    assert generator.max_input_tokens == 64 - 8  # the positions hold the prompt and the answer
    answer = generator.generate(QUESTION, PASSAGES)
    assert isinstance(answer, str)
    assert answer.split() == ["tokyo"] * 8  # the continuation only, not the prompt echoed back
    assert not answer.lower().startswith("answer the question")


def test_transformers_long_prompt_keeps_question_and_fits(tiny_gpt2):
    generator = TransformersGenerator(str(tiny_gpt2), max_new_tokens=8)
    long_passages = [dict(p, text=p["text"] + " Paris") for p in PASSAGES] * 4  # 12 passages, far over 56 tokens
    prompt = generator._fit_prompt(QUESTION, long_passages)
    assert QUESTION in prompt and "[1]" in prompt and "[12]" not in prompt  # least relevant dropped first
    one_huge = [{"id": 1, "score": 1.0, "metadata": {}, "text": "the eiffel tower is in paris. " * 50}]
    assert generator.generate(QUESTION, one_huge).split() == ["tokyo"] * 8  # hard-truncated, still runs


def test_transformers_bad_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        TransformersGenerator(str(missing))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty-dir.*config.json"):
        TransformersGenerator(str(empty))


# --------------------------------------------------------------------------------------------
# make_generator


def test_make_generator_errors_name_the_setting(monkeypatch):
    for var in ("RAYINDEX_OPENAI_BASE_URL", "OPENAI_BASE_URL", "RAYINDEX_OPENAI_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValidationError, match="generator"):
        GeneratorConfig(generator="gpt")  # the choices are the model's: extractive, openai, transformers
    with pytest.raises(ValueError, match="RAYINDEX_OPENAI_BASE_URL"):
        make_generator(GeneratorConfig(generator="openai", generator_model="m"))
    with pytest.raises(ValueError, match="RAYINDEX_OPENAI_MODEL"):
        make_generator(GeneratorConfig(generator="openai", generator_url="http://localhost:8000/v1"))
    with pytest.raises(ValueError, match="--generator-model"):
        make_generator(GeneratorConfig(generator="transformers"))
    with pytest.raises(ValueError, match="encode"):
        make_generator(GeneratorConfig())


def test_make_generator_reads_environment(monkeypatch, tiny_t5):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://fallback:1")
    monkeypatch.setenv("RAYINDEX_OPENAI_BASE_URL", "http://llm.internal:8000/v1")
    monkeypatch.setenv("RAYINDEX_OPENAI_MODEL", "qwen")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    generator = make_generator(GeneratorConfig(generator="openai", generator_timeout=3))
    assert isinstance(generator, OpenAIGenerator)
    assert generator.url == "http://llm.internal:8000/v1/chat/completions"
    assert (generator.model, generator.api_key, generator.timeout_s) == ("qwen", "sk-env", 3)
    # Settings given win over the environment.
    generator = make_generator(
        GeneratorConfig(generator="openai", generator_model="llama", generator_url="http://other:9"), api_key="sk-arg"
    )
    assert (generator.url, generator.model, generator.api_key) == (
        "http://other:9/v1/chat/completions",
        "llama",
        "sk-arg",
    )

    assert make_generator(GeneratorConfig(), encode=lambda texts: None).name == "extractive"
    assert (
        make_generator(GeneratorConfig(generator="transformers", generator_model=str(tiny_t5))).name == "transformers"
    )
