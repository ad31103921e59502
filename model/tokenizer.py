"""Byte-level BPE tokenizer with nanochat's chat tokens and DeepSeek-OCR's vision tokens.

Built on HuggingFace ``tokenizers`` and stored as one ``tokenizer.json`` (it travels inside
every checkpoint). The pre-tokenizer is nanochat's GPT-4-style split (numbers in groups of
one or two digits) followed by ByteLevel, so any unicode text round-trips exactly.

Special tokens (15, all single ids):

- chat (nanochat): ``<|bos|> <|user_start|> <|user_end|> <|assistant_start|>
  <|assistant_end|> <|python_start|> <|python_end|> <|output_start|> <|output_end|>``
- vision: ``<image>`` (one id per vision slot) and the grounding markup
  ``<|grounding|> <|ref|> <|/ref|> <|det|> <|/det|>``.

Parsing rule of :meth:`Tokenizer.encode`: vision/grounding tokens written in text always
become their ids (they appear in prompts and targets, e.g.
``<|ref|>title<|/ref|><|det|>[[1,2,3,4]]<|/det|>``); chat tokens written in text are plain
text unless ``allow_special=True`` (so data cannot forge turn boundaries).

Sequence conventions: a sequence starts with ``<|bos|>`` (:attr:`Tokenizer.bos_id`); a
vision response and an assistant turn both end with ``<|assistant_end|>``
(:attr:`Tokenizer.eos_id`), the one token the engine stops on.

Id layout of a trained tokenizer: BPE tokens first, then the 9 chat tokens, then the 6 vision
tokens, the same order as a converted nanochat tokenizer (:func:`load_nanochat_pickle`),
whose chat tokens keep their nanochat ids and whose vision tokens are appended after them.
"""

from __future__ import annotations

import copy
import copyreg
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

# nanochat's split: GPT-4's pattern with \p{N}{1,2} instead of {1,3}
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

CHAT_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|grounding|>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>")
VISION_TOKENS = (IMAGE_TOKEN, *GROUNDING_TOKENS)
SPECIAL_TOKENS = CHAT_TOKENS + VISION_TOKENS
BOS = "<|bos|>"
EOS = "<|assistant_end|>"
TOKENIZER_FILE = "tokenizer.json"


def _alternation(tokens: Sequence[str]) -> re.Pattern[str]:
    # longest first, so that no token can shadow a longer one that starts with it
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


_SPLIT_VISION = _alternation(VISION_TOKENS)
_SPLIT_GROUNDING = _alternation(GROUNDING_TOKENS)
_SPLIT_ALL = _alternation(SPECIAL_TOKENS)


def _new_hf_tokenizer(pattern: str = SPLIT_PATTERN, bpe: models.BPE | None = None) -> HFTokenizer:
    hf = HFTokenizer(bpe if bpe is not None else models.BPE())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = None
    return hf


class Tokenizer:
    """Encode/decode text and render vision samples and chat conversations to ids + loss masks."""

    def __init__(self, hf: HFTokenizer, add_missing_specials: bool = False):
        """Wrap a HF tokenizer that already holds the 15 special tokens as *special* added tokens.

        ``add_missing_specials`` appends absent ones at the end of the vocabulary (this grows
        ``vocab_size``: the model's embedding must cover it).
        """
        hf = HFTokenizer.from_str(hf.to_str())  # private copy: the flag below must not leak
        added = {tok.content: (idx, tok.special) for idx, tok in hf.get_added_tokens_decoder().items()}
        missing = [t for t in SPECIAL_TOKENS if t not in added]
        if missing and add_missing_specials:
            hf.add_special_tokens(missing)
            added = {tok.content: (idx, tok.special) for idx, tok in hf.get_added_tokens_decoder().items()}
            missing = []
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        not_special = [t for t in SPECIAL_TOKENS if not added[t][1]]
        if not_special:
            raise ValueError(f"tokens {not_special} must be registered as special added tokens")
        # added tokens are matched by our own splitter (see encode), never by HF's
        hf.encode_special_tokens = True
        self._hf = hf
        self._special_ids = {t: added[t][0] for t in SPECIAL_TOKENS}
        self._special_id_set = frozenset(self._special_ids.values())
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)

    # -- construction and storage ------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train byte-level BPE on any text iterator.

        ``vocab_size`` includes the 15 special tokens and is an upper bound: training stops
        earlier when the corpus has no pairs left to merge.
        """
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise ValueError(f"vocab_size must be at least {floor} (256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        hf = _new_hf_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS),
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        hf.train_from_iterator(texts, trainer)
        hf.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` (a file, or a directory that contains one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def to_json(self) -> str:
        return self._hf.to_str()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._hf.save(str(path))
        return path

    # -- vocabulary --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._special_ids[BOS]

    @property
    def eos_id(self) -> int:
        """``<|assistant_end|>``: ends vision responses and assistant turns; decoding stops here."""
        return self._special_ids[EOS]

    @property
    def image_id(self) -> int:
        return self._special_ids[IMAGE_TOKEN]

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    def token_id(self, name: str) -> int:
        """The id of one token string (a special token or any vocabulary entry)."""
        idx = self._special_ids.get(name)
        if idx is None:
            idx = self._hf.token_to_id(name)
        if idx is None:
            raise KeyError(f"{name!r} is not a token of this tokenizer")
        return idx

    def id_to_token(self, idx: int) -> str:
        self._check_ids([idx])
        return self._hf.id_to_token(idx)

    def is_special(self, idx: int) -> bool:
        return idx in self._special_id_set

    # -- encode / decode ---------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added.

        Vision and grounding tokens in the text always map to their ids; chat tokens only
        with ``allow_special=True`` (otherwise they are encoded as ordinary text).
        """
        return self._encode(text, _SPLIT_ALL if allow_special else _SPLIT_VISION)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts in one call into the (parallel) HF encoder."""
        splitter = _SPLIT_ALL if allow_special else _SPLIT_VISION
        pieces = [self._pieces(text, splitter) for text in texts]
        plain = [p for row in pieces for p in row if isinstance(p, str)]
        encoded = iter(e.ids for e in self._hf.encode_batch(plain, add_special_tokens=False)) if plain else iter(())
        out = []
        for row in pieces:
            ids: list[int] = []
            for p in row:
                if isinstance(p, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(p)
            out.append(ids)
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with no special token parsed at all."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self._hf.encode(text, add_special_tokens=False).ids if text else []

    def _pieces(self, text: str, splitter: re.Pattern[str] | None) -> list[str | int]:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        if splitter is None:
            return [text] if text else []
        pieces: list[str | int] = []
        for i, part in enumerate(splitter.split(text)):
            if i % 2:  # odd positions are the captured special tokens
                pieces.append(self._special_ids[part])
            elif part:
                pieces.append(part)
        return pieces

    def _encode(self, text: str, splitter: re.Pattern[str] | None) -> list[int]:
        ids: list[int] = []
        for p in self._pieces(text, splitter):
            if isinstance(p, str):
                ids.extend(self._hf.encode(p, add_special_tokens=False).ids)
            else:
                ids.append(p)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` drops all 15 special tokens (grounding markup too)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self._vocab_size})")

    # -- vision samples ----------------------------------------------------------------

    def render_vision_prompt(self, prompt: str, n_image_tokens: int | Sequence[int]) -> list[int]:
        """BOS + prompt, each ``<image>`` expanded to its number of slot ids (plain template)."""
        counts = _image_counts(n_image_tokens)
        parts = prompt.split(IMAGE_TOKEN)
        if len(parts) - 1 != len(counts):
            raise ValueError(
                f"prompt has {len(parts) - 1} {IMAGE_TOKEN} placeholder(s) but {len(counts)} image token count(s) were given"
            )
        ids = [self.bos_id]
        for i, part in enumerate(parts):
            ids.extend(self._encode(part, _SPLIT_VISION))
            if i < len(counts):
                ids.extend([self.image_id] * counts[i])
        return ids

    def render_vision(
        self, prompt: str, response: str, n_image_tokens: int | Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a vision sample: prompt (mask 0), response + EOS (mask 1)."""
        if IMAGE_TOKEN in response:
            raise ValueError(f"the response must not contain {IMAGE_TOKEN}: image slots belong to the prompt")
        prompt_ids = self.render_vision_prompt(prompt, n_image_tokens)
        response_ids = self._encode(response, _SPLIT_VISION) + [self.eos_id]
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    # -- chat conversations (nanochat's rules) -----------------------------------------

    def render_conversation(
        self, messages: Sequence[Mapping[str, Any]] | Mapping[str, Any], max_tokens: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation, nanochat style.

        BOS; a leading system message is merged into the first user message; roles must
        alternate user/assistant. User turns ``<|user_start|> text <|user_end|>`` are mask 0.
        Assistant turns are ``<|assistant_start|>`` (mask 0), the content and
        ``<|assistant_end|>`` (mask 1). Assistant content is a string or a list of parts
        ``{"type": "text" | "python" | "python_output", "text": ...}``: python parts are
        wrapped in ``<|python_start|>..<|python_end|>`` (mask 1), tool output in
        ``<|output_start|>..<|output_end|>`` (mask 0: it comes from the tool at run time).
        Grounding tokens in text are parsed; ``<image>`` and chat tokens written in text stay
        plain text, so a text-only sample never opens an image slot or forges a turn.
        """
        messages = _conversation_messages(messages)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], value: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([value] * len(tokens))

        sid = self._special_ids
        add(self.bos_id, 0)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
                add(sid["<|user_start|>"], 0)
                add(self._encode(content, _SPLIT_GROUNDING), 0)
                add(sid["<|user_end|>"], 0)
                continue
            add(sid["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self._encode(content, _SPLIT_GROUNDING), 1)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    kind, text = part.get("type"), part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"message {i} part {j}: 'text' must be a string")
                    part_ids = self._encode(text, _SPLIT_GROUNDING)
                    if kind == "text":
                        add(part_ids, 1)
                    elif kind == "python":
                        add(sid["<|python_start|>"], 1)
                        add(part_ids, 1)
                        add(sid["<|python_end|>"], 1)
                    elif kind == "python_output":
                        add(sid["<|output_start|>"], 0)
                        add(part_ids, 0)
                        add(sid["<|output_end|>"], 0)
                    else:
                        raise ValueError(f"message {i} part {j}: unknown part type {kind!r}")
            else:
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
            add(self.eos_id, 1)
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be positive, got {max_tokens}")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, messages: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[int]:
        """Ids that prime the assistant's next turn: the conversation (minus a trailing
        assistant message) followed by ``<|assistant_start|>``."""
        messages = list(_conversation_messages(messages))
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation(messages)
        return ids + [self._special_ids["<|assistant_start|>"]]


def _image_counts(n_image_tokens: int | Sequence[int]) -> list[int]:
    counts = [n_image_tokens] if isinstance(n_image_tokens, int) else list(n_image_tokens)
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"image token counts must be positive integers, got {n!r}")
    return counts


def _conversation_messages(messages: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validated messages with a leading system message merged into the first user turn."""
    if isinstance(messages, Mapping):
        messages = messages.get("messages", ())
    messages = [dict(m) for m in messages]
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"message {i} needs 'role' and 'content' keys")
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        if not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
            raise ValueError("system and user contents must be strings")
        merged = copy.copy(messages[1])
        merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = [merged] + messages[2:]
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i} is from {m['role']!r}, expected {expected!r} (roles must alternate)")
    return messages


# ---------------------------------------------------------------------------------------
# nanochat / tiktoken import


def _byte_to_unicode() -> dict[int, str]:
    """ByteLevel's printable stand-in for each byte (GPT-2's table).

    Printable latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
    DEL, NBSP, soft hyphen) take the code points 256, 257, ... in byte order.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_of(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The pair that BPE merges last to build ``token`` from lower-ranked tokens."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_at = r, i
        if best_rank is None:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def from_mergeable_ranks(
    mergeable_ranks: Mapping[bytes, int], pattern: str, special_tokens: Mapping[str, int]
) -> Tokenizer:
    """A :class:`Tokenizer` equal to a tiktoken-style encoding (same ids for every text).

    Ranks become ids, merges are recovered by replaying BPE below each token's rank, the
    special tokens keep their ids (they must directly follow the ranks), and vision tokens
    that are missing are appended after them.
    """
    n = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(n)):
        raise ValueError("mergeable ranks must be the contiguous ids 0..n-1")
    missing_bytes = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
    if missing_bytes:
        raise ValueError(f"mergeable ranks lack single-byte tokens, e.g. {missing_bytes[:5]}")
    specials = sorted(special_tokens.items(), key=lambda kv: kv[1])
    if [idx for _, idx in specials] != list(range(n, n + len(specials))):
        raise ValueError(f"special token ids must follow the ranks contiguously from {n}, got {dict(specials)}")

    to_char = _byte_to_unicode()
    spell = lambda token: "".join(to_char[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in mergeable_ranks.items()}
    merges = [
        tuple(spell(p) for p in _merge_of(token, rank, mergeable_ranks))
        for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])
        if len(token) > 1
    ]
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does
    hf = _new_hf_tokenizer(pattern, models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.add_special_tokens([name for name, _ in specials])
    for name, idx in specials:
        if hf.token_to_id(name) != idx:
            raise ValueError(f"special token {name!r} landed on id {hf.token_to_id(name)}, expected {idx}")
    return Tokenizer(hf, add_missing_specials=True)


def from_tiktoken(encoding: Any) -> Tokenizer:
    """Convert an in-memory ``tiktoken.Encoding`` (e.g. nanochat's) to a :class:`Tokenizer`."""
    return from_mergeable_ranks(encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens)


class _EncodingState:
    """Stands in for ``tiktoken.core.Encoding`` while unpickling: it only keeps the state."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled tiktoken Encoding needs; refuses everything else."""

    _ALLOWED = {
        ("tiktoken.core", "Encoding"): _EncodingState,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("builtins", "object"): object,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a nanochat tokenizer.pkl holds only a tiktoken Encoding"
            ) from None


class PickleNotAllowedError(PermissionError):
    """Raised when a pickle would be read without the caller's explicit consent."""


def load_nanochat_pickle(path: str | os.PathLike, *, allow_pickle: bool = False) -> Tokenizer:
    """Read nanochat's ``tokenizer.pkl`` (a pickled ``tiktoken.Encoding``) as a :class:`Tokenizer`.

    Unpickling a file can execute arbitrary code, so this refuses unless
    ``allow_pickle=True`` says the file is trusted. Even then the unpickler resolves only
    ``tiktoken.core.Encoding`` (into an inert stand-in that keeps its state), so tiktoken
    need not be installed. The result has the same ids as nanochat for every text; the six
    vision tokens are appended after nanochat's specials (65536..65541 for the 65536-token
    nanochat vocabulary), so ``vocab_size`` grows by 6. ``save`` it to get a
    ``tokenizer.json``. ``path`` may be the file or the directory holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.pkl"
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"refusing to unpickle {path}: pickle files can run arbitrary code when loaded. "
            "Pass allow_pickle=True only for a file you trust (e.g. one your own nanochat run wrote)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"no nanochat tokenizer pickle at {path}")
    with open(path, "rb") as fh:
        obj = _TokenizerUnpickler(fh).load()
    state = obj.state if isinstance(obj, _EncodingState) else None
    if isinstance(state, str):
        raise ValueError(
            f"{path} refers to tiktoken's registered encoding {state!r} by name; "
            "convert it in memory with from_tiktoken(tiktoken.get_encoding(name)) instead"
        )
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise ValueError(f"{path} does not hold a tiktoken Encoding")
    return from_mergeable_ranks(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])


__all__ = [
    "BOS",
    "CHAT_TOKENS",
    "EOS",
    "GROUNDING_TOKENS",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "SPLIT_PATTERN",
    "VISION_TOKENS",
    "PickleNotAllowedError",
    "Tokenizer",
    "from_mergeable_ranks",
    "from_tiktoken",
    "load_nanochat_pickle",
]
