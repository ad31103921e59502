"""Tokenizer: training, round trips, special tokens, vision/chat rendering, storage, nanochat import."""

from __future__ import annotations

import os
import pickle
import random
import sys
import time
import types

import pytest

from model.tokenizer import (
    CHAT_TOKENS,
    GROUNDING_TOKENS,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    VISION_TOKENS,
    PickleNotAllowedError,
    Tokenizer,
    _byte_to_unicode,
    load_nanochat_pickle,
)

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which document table "
    "figure page section total revenue model image text title caption header footer result value "
    "über café naïve 数据 表格 文档 résumé"
).split()


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Prose, markdown and HTML tables, numbers and code: what OCR targets look like."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
        kind = i % 4
        if kind == 0:
            docs.append(words.capitalize() + ".\n\n")
        elif kind == 1:
            cells = "".join(f"<td>{rng.randint(0, 9999)}</td>" for _ in range(3))
            docs.append(f"<table><tr><td>{words[:20]}</td>{cells}</tr></table>\n")
        elif kind == 2:
            docs.append(f"| {words[:15]} | {rng.random():.3f} |\n|---|---|\n| a | {rng.randint(1, 99)} |\n")
        else:
            docs.append(f"def f_{i}(x):\n\treturn x * {rng.randint(2, 64)}  # {words[:25]}\n")
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_corpus(), vocab_size=1024)


ROUND_TRIP = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline three\n\n\n",
    "\ttabs\tand\t\tmore tabs\t",
    "<table><tr><td>1</td><td>2,345.67</td></tr>\n<tr><td colspan=\"2\">x</td></tr></table>",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "naïve café 数据表格 Ελληνικά العربية עברית हिन्दी",
    "emoji 🎉👩‍👩‍👧 and zero-width\u200bjoiner \u2028 \ufeff",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "looks special: <|bos|> <|assistant_end|> <|ref|> <|re f|> <image <|",
    "\x00\x01 control \x7f bytes",
]


# --- training and round trips ---------------------------------------------------------


def test_train_is_fast_bounded_and_deterministic():
    corpus = make_corpus()
    start = time.perf_counter()
    a = Tokenizer.train(corpus, vocab_size=2048)
    assert time.perf_counter() - start < 5.0
    assert 256 + len(SPECIAL_TOKENS) < a.vocab_size <= 2048
    b = Tokenizer.train(iter(corpus), vocab_size=2048)  # any iterator works
    assert a.to_json() == b.to_json()
    small = Tokenizer.train(corpus, vocab_size=512)
    assert small.vocab_size == 512
    # specials sit at the end, chat tokens then vision tokens
    assert [small.token_id(t) for t in SPECIAL_TOKENS] == list(range(512 - 15, 512))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x2FF)] + list("\n\t\r 世界🎉<>|/") + ["<|ref|>", "<image>"]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        assert tok.decode(tok.encode(text)) == text


def test_training_compresses_frequent_text(tok):
    text = "<table><tr><td>the document</td></tr></table>"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_digits_split_in_groups_of_at_most_two(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567 89")]
    digits = [p.strip() for p in pieces if p.strip()]
    assert "".join(digits) == "123456789"
    assert all(len(p) <= 2 for p in digits)


def test_encode_batch_matches_encode(tok):
    texts = ROUND_TRIP + ["<image>\n<|grounding|>Convert.", "<|bos|>x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allow_special=True) == [tok.encode(t, allow_special=True) for t in texts]


# --- special tokens -------------------------------------------------------------------


def test_special_tokens_are_single_ids(tok):
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == 15
    for name in SPECIAL_TOKENS:
        assert tok.encode(name, allow_special=True) == [tok.token_id(name)]
        assert tok.decode([tok.token_id(name)]) == name
        assert tok.is_special(tok.token_id(name))
    for name in VISION_TOKENS:  # parsed in plain text, always
        assert tok.encode(name) == [tok.token_id(name)]
    for name in CHAT_TOKENS:  # plain text unless allowed
        ids = tok.encode(name)
        assert len(ids) > 1 and not any(tok.is_special(i) for i in ids)
    assert tok.bos_id == tok.token_id("<|bos|>")
    assert tok.eos_id == tok.token_id("<|assistant_end|>")
    assert tok.image_id == tok.token_id("<image>")


def test_grounding_markup_maps_to_ids(tok):
    text = "<|ref|>title<|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<|ref|>") and ids[-1] == tok.token_id("<|/det|>")
    assert ids.index(tok.token_id("<|/ref|>")) == 1 + len(tok.encode("title"))
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "title[[1,2,3,4]]"


def test_decode_skip_special(tok):
    ids = [tok.bos_id] + tok.encode("hello") + [tok.image_id, tok.eos_id]
    assert tok.decode(ids) == "<|bos|>hello<image><|assistant_end|>"
    assert tok.decode(ids, skip_special=True) == "hello"


# --- vision rendering -----------------------------------------------------------------


def test_render_vision_expands_images_and_masks_response(tok):
    prompt = "<image>\n<|grounding|>Convert the document to markdown."
    ids, mask = tok.render_vision(prompt, "# Title\n<|ref|>text<|/ref|>", 7)
    prompt_ids = tok.render_vision_prompt(prompt, 7)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert prompt_ids[0] == tok.bos_id and prompt_ids[1:8] == [tok.image_id] * 7
    assert prompt_ids[8:] == tok.encode("\n<|grounding|>Convert the document to markdown.")
    assert tok.token_id("<|grounding|>") in prompt_ids
    response = ids[len(prompt_ids) :]
    assert response == tok.encode("# Title\n<|ref|>text<|/ref|>") + [tok.eos_id]
    assert mask == [0] * len(prompt_ids) + [1] * len(response)
    assert ids.count(tok.image_id) == 7


def test_render_vision_multiple_images(tok):
    ids, mask = tok.render_vision("A <image> B <image>", "ok", [3, 5])
    a, b = tok.encode("A "), tok.encode(" B ")
    assert ids[: 1 + len(a) + 3 + len(b) + 5] == [tok.bos_id] + a + [tok.image_id] * 3 + b + [tok.image_id] * 5
    assert sum(mask) == len(tok.encode("ok")) + 1


@pytest.mark.parametrize(
    "prompt, counts",
    [("Free OCR.", 5), ("Free OCR.", [5]), ("<image><image>", 5), ("<image>", [1, 2]), ("<image>", []),
     ("<image>", 0), ("<image>", -3), ("<image>", True), ("<image>", [2.0])],
)
def test_render_vision_count_mismatch(tok, prompt, counts):
    with pytest.raises(ValueError):
        tok.render_vision(prompt, "x", counts)


def test_render_vision_refuses_image_in_response(tok):
    with pytest.raises(ValueError, match="response"):
        tok.render_vision("<image>", "see <image>", 2)


# --- chat rendering -------------------------------------------------------------------


def test_render_conversation_nanochat_rules(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids, mask = tok.render_conversation(messages)
    s = tok.special_ids
    enc = tok.encode
    expected = [
        ([tok.bos_id], 0),
        ([s["<|user_start|>"]] + enc("Be brief.\n\nWhat is 2+2?") + [s["<|user_end|>"]], 0),
        ([s["<|assistant_start|>"]], 0),
        (enc("Let me compute."), 1),
        ([s["<|python_start|>"]] + enc("2+2") + [s["<|python_end|>"]], 1),
        ([s["<|output_start|>"]] + enc("4") + [s["<|output_end|>"]], 0),
        (enc("It is 4.") + [s["<|assistant_end|>"]], 1),
        ([s["<|user_start|>"]] + enc("Thanks") + [s["<|user_end|>"], s["<|assistant_start|>"]], 0),
        (enc("You are welcome.") + [s["<|assistant_end|>"]], 1),
    ]
    assert ids == [i for chunk, _ in expected for i in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]
    assert messages[1]["content"] == "What is 2+2?"  # input not mutated
    assert tok.render_conversation({"messages": messages}) == (ids, mask)

    short_ids, short_mask = tok.render_conversation(messages, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_conversation_keeps_image_and_chat_tokens_as_text(tok):
    ids, _ = tok.render_conversation([
        {"role": "user", "content": "<image> <|assistant_end|> <|ref|>x<|/ref|>"},
        {"role": "assistant", "content": "ok"},
    ])
    assert tok.image_id not in ids
    assert ids.count(tok.eos_id) == 1  # only the real end of the assistant turn
    assert tok.token_id("<|ref|>") in ids  # grounding markup is still parsed


def test_render_for_completion(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = tok.render_for_completion(messages)
    full, _ = tok.render_conversation(messages[:1])
    assert ids == full + [tok.token_id("<|assistant_start|>")]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": ["parts"]}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}],
        [{"content": "no role"}],
    ],
)
def test_render_conversation_errors(tok, messages):
    with pytest.raises(ValueError):
        tok.render_conversation(messages)


# --- storage --------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json" and path.is_file()
    for loaded in (Tokenizer.load(tmp_path / "ckpt"), Tokenizer.load(path), Tokenizer.from_json(tok.to_json())):
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.special_ids == tok.special_ids
        for text in ROUND_TRIP + ["<image>\n<|grounding|>Free OCR."]:
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
        assert loaded.render_vision("<image>x", "y", 4) == tok.render_vision("<image>x", "y", 4)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nowhere")


def test_tokenizer_json_without_specials_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    bare = HFTokenizer(models.BPE())
    with pytest.raises(ValueError, match="lacks special tokens"):
        Tokenizer(bare)
    assert Tokenizer(bare, add_missing_specials=True).vocab_size == 15


def test_errors(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(KeyError):
        tok.token_id("<|no_such_token|>")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation([{"role": "user", "content": "x"}], max_tokens=0)


# --- nanochat tokenizer.pkl -----------------------------------------------------------


def test_pickle_is_refused_without_consent(tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps({"not": "read"}))
    with pytest.raises(PickleNotAllowedError, match="arbitrary code"):
        load_nanochat_pickle(path)
    with pytest.raises(PickleNotAllowedError):
        load_nanochat_pickle(tmp_path)  # directory form, same refusal


def _ranks_of(tok: Tokenizer) -> dict[bytes, int]:
    """The BPE part of a trained tokenizer as tiktoken-style mergeable ranks."""
    to_byte = {c: b for b, c in _byte_to_unicode().items()}
    vocab = tok._hf.get_vocab(with_added_tokens=False)
    return {bytes(to_byte[c] for c in piece): idx for piece, idx in vocab.items()}


def _fake_tiktoken(monkeypatch) -> type:
    """A class that pickles exactly like tiktoken.core.Encoding (module, name and state)."""

    class Encoding:
        def __init__(self, name, pat_str, mergeable_ranks, special_tokens):
            self.name, self._pat_str = name, pat_str
            self._mergeable_ranks, self._special_tokens = mergeable_ranks, special_tokens

        def __getstate__(self):
            return {"name": self.name, "pat_str": self._pat_str,
                    "mergeable_ranks": self._mergeable_ranks, "special_tokens": self._special_tokens}

    Encoding.__module__, Encoding.__qualname__ = "tiktoken.core", "Encoding"
    core = types.ModuleType("tiktoken.core")
    core.Encoding = Encoding
    monkeypatch.setitem(sys.modules, "tiktoken", types.ModuleType("tiktoken"))
    monkeypatch.setitem(sys.modules, "tiktoken.core", core)
    return Encoding


def test_nanochat_pickle_converts_with_identical_ids(tok, tmp_path, monkeypatch):
    ranks = _ranks_of(tok)
    n = len(ranks)
    Encoding = _fake_tiktoken(monkeypatch)
    enc = Encoding("rustbpe", SPLIT_PATTERN, ranks, {t: n + i for i, t in enumerate(CHAT_TOKENS)})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    monkeypatch.delitem(sys.modules, "tiktoken.core")  # loading must not need tiktoken
    monkeypatch.delitem(sys.modules, "tiktoken")

    conv = load_nanochat_pickle(tmp_path, allow_pickle=True)
    # chat tokens keep nanochat's ids; the vision tokens are appended after them
    assert conv.special_ids == tok.special_ids and conv.vocab_size == tok.vocab_size
    for text in ROUND_TRIP + make_corpus(40, seed=7):
        assert conv.encode(text) == tok.encode(text)
        assert conv.decode(conv.encode(text)) == text
    conv.save(tmp_path / "out")
    assert Tokenizer.load(tmp_path / "out").encode("café 123") == tok.encode("café 123")


def test_pickle_with_other_globals_is_refused_even_when_allowed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_nanochat_pickle(path, allow_pickle=True)
    path.write_bytes(pickle.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="tiktoken Encoding"):
        load_nanochat_pickle(path, allow_pickle=True)


def test_matches_real_tiktoken(tok, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from model.tokenizer import from_tiktoken

    ranks = _ranks_of(tok)
    n = len(ranks)
    enc = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: n + i for i, t in enumerate(CHAT_TOKENS)})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    for conv in (from_tiktoken(enc), load_nanochat_pickle(tmp_path / "tokenizer.pkl", allow_pickle=True)):
        for text in ROUND_TRIP + make_corpus(40, seed=3):
            assert conv.encode_ordinary(text) == enc.encode_ordinary(text)
        assert conv.bos_id == enc.encode_single_token("<|bos|>")
        assert conv.image_id == enc.n_vocab  # first id after nanochat's vocabulary
        assert set(GROUNDING_TOKENS) | {IMAGE_TOKEN} <= set(conv.special_ids)
