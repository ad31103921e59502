"""The task record schema (vision and text) and its validation.

A manifest (JSONL line or Parquet row) holds one record:

- vision ``{id, image, prompt, response, task}``: ``image`` is a path (relative to the
  manifest's directory, or absolute) or an ``s3://`` URI; ``prompt`` holds exactly one
  ``<image>``; ``response`` is the target text (never an ``<image>``).
- text ``{id, messages, task}``: a nanochat conversation, ``messages`` a list of
  ``{role, content}``; ``task`` defaults to ``"text"``.

Other keys (``split``, ``page``, ``boxes`` ...) are kept in ``extra`` and ignored by
preprocessing. Invalid records raise :class:`RecordError` with a short ``reason`` that the
preprocess job writes into its errors table, so one bad line never stops a job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from model.tokenizer import IMAGE_TOKEN

TEXT_TASK = "text"
ROLES = ("system", "user", "assistant")

# reason -> what it means; the vocabulary of the preprocess errors table
ERROR_REASONS: dict[str, str] = {
    "bad_record": "not a valid record (bad JSON, missing/mistyped fields, unrenderable conversation)",
    "no_image_token": "a vision prompt without the <image> placeholder",
    "missing": "the image file does not exist",
    "empty": "the image file has zero bytes",
    "unreadable": "not an image, or a corrupt header",
    "truncated": "the pixel data ends early or is corrupt",
    "too_large": "more pixels (or bytes) than the limit: a decompression bomb or an oversized scan",
    "too_small": "a side shorter than the processor's minimum",
    "too_long": "the token sequence exceeds --max-seq-len",
    "internal": "an unexpected exception while processing the record (a bug: please report)",
}


class RecordError(ValueError):
    """A record that cannot become a training row; ``reason`` is a key of ERROR_REASONS."""

    def __init__(self, reason: str, message: str, record_id: str | None = None, image: str | None = None):
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown record error reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.record_id = record_id
        self.image = image  # the resolved image path/URI, for image errors


@dataclass(frozen=True)
class VisionRecord:
    id: str
    image: str
    prompt: str
    response: str
    task: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    kind = "vision"


@dataclass(frozen=True)
class TextRecord:
    id: str
    messages: list[dict[str, Any]]
    task: str = TEXT_TASK
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    kind = "text"


Record = Union[VisionRecord, TextRecord]
_VISION_KEYS = ("id", "image", "prompt", "response", "task")
_TEXT_KEYS = ("id", "messages", "task")


def record_id_of(obj: Any) -> str | None:
    """Best-effort id of a raw record (for error rows of records that fail validation)."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if isinstance(obj, Mapping):
        rid = obj.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            return str(rid)
    return None


def parse_record(obj: Mapping[str, Any] | str | bytes) -> Record:
    """A validated :class:`VisionRecord` or :class:`TextRecord` from a dict or a JSON line.

    Raises :class:`RecordError` (``bad_record`` or ``no_image_token``) naming the problem.
    """
    if isinstance(obj, (bytes, bytearray)):
        obj = bytes(obj).decode("utf-8", errors="replace")
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError as exc:
            raise RecordError("bad_record", f"not valid JSON ({exc})") from None
    if not isinstance(obj, Mapping):
        raise RecordError("bad_record", f"a record must be a JSON object, got {type(obj).__name__}")
    rid = _check_id(obj)
    has_image, has_messages = obj.get("image") is not None, obj.get("messages") is not None
    if has_image and has_messages:
        raise RecordError("bad_record", "has both 'image' and 'messages': a record is either vision or text", rid)
    if has_image:
        return _vision(obj, rid)
    if has_messages:
        return _text(obj, rid)
    raise RecordError("bad_record", "needs 'image' (vision record) or 'messages' (text record)", rid)


def validate_record(obj: Mapping[str, Any] | str) -> list[str]:
    """Problems of a raw record as messages (empty when valid); for manifest linting."""
    try:
        parse_record(obj)
    except RecordError as exc:
        return [str(exc)]
    return []


def _check_id(obj: Mapping[str, Any]) -> str:
    rid = obj.get("id")
    if rid is None:
        raise RecordError("bad_record", "missing required field 'id'")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RecordError("bad_record", f"'id' must be a string, got {type(rid).__name__}")
    rid = str(rid)
    if not rid.strip():
        raise RecordError("bad_record", "'id' is empty")
    return rid


def _str_field(obj: Mapping[str, Any], key: str, rid: str, allow_empty: bool = True) -> str:
    if key not in obj or obj[key] is None:
        raise RecordError("bad_record", f"vision record lacks required field {key!r}", rid)
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("bad_record", f"{key!r} must be a string, got {type(value).__name__}", rid)
    if not allow_empty and not value.strip():
        raise RecordError("bad_record", f"{key!r} is empty", rid)
    return value


def _vision(obj: Mapping[str, Any], rid: str) -> VisionRecord:
    image = _str_field(obj, "image", rid, allow_empty=False)
    prompt = _str_field(obj, "prompt", rid)
    response = _str_field(obj, "response", rid)
    task = _str_field(obj, "task", rid, allow_empty=False)
    n = prompt.count(IMAGE_TOKEN)
    if n == 0:
        raise RecordError("no_image_token", f"prompt {_short(prompt)} has no {IMAGE_TOKEN} placeholder", rid)
    if n > 1:
        raise RecordError("bad_record", f"prompt has {n} {IMAGE_TOKEN} placeholders; a record carries one image", rid)
    if IMAGE_TOKEN in response:
        raise RecordError("bad_record", f"response contains {IMAGE_TOKEN}: image slots belong to the prompt", rid)
    if task == TEXT_TASK:
        raise RecordError("bad_record", f"task {TEXT_TASK!r} is reserved for text-only records", rid)
    extra = {k: v for k, v in obj.items() if k not in _VISION_KEYS}
    return VisionRecord(rid, image, prompt, response, task, extra)


def _text(obj: Mapping[str, Any], rid: str) -> TextRecord:
    messages = obj["messages"]
    if isinstance(messages, tuple):
        messages = list(messages)
    if not isinstance(messages, list) or not messages:
        raise RecordError("bad_record", "'messages' must be a non-empty list of {role, content}", rid)
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RecordError("bad_record", f"message {i} must be an object, got {type(m).__name__}", rid)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError("bad_record", f"message {i} has role {role!r}; expected one of {ROLES}", rid)
        if not isinstance(content, (str, list)):
            raise RecordError("bad_record", f"message {i} content must be a string or a list of parts", rid)
        clean.append({"role": role, "content": content})
    task = obj.get("task", TEXT_TASK)
    if task is None:
        task = TEXT_TASK
    if not isinstance(task, str) or not task.strip():
        raise RecordError("bad_record", f"'task' must be a non-empty string, got {task!r}", rid)
    extra = {k: v for k, v in obj.items() if k not in _TEXT_KEYS}
    return TextRecord(rid, clean, task, extra)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")
