"""Request parsing and response shapes of the HTTP API (pure functions, no Ray, no FastAPI).

``/v1/ocr`` takes ``task`` (``model.tasks.TASK_PROMPTS``) or a raw ``prompt`` with exactly one
``<image>``; ``/v1/chat/completions`` follows OpenAI's chat format with images as
``image_url`` data URIs. Both reduce to a :class:`Job`: prompt + image bytes + sampling.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from model.config import MODES
from model.grounding import parse_grounding, to_markdown
from model.tasks import TASK_PROMPTS
from serve.errors import bad_request, invalid_parameter
from serve.images import decode_base64_image
from serve.settings import Limits

IMAGE_TOKEN = "<image>"


@dataclass
class Job:
    """One generation: the prompt (one ``<image>`` per image), the images' bytes and sampling."""

    prompt: str
    images: list[bytes]
    mode: str
    params: dict[str, Any]
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ field parsing
def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise invalid_parameter(f"{name} must be an integer, got {value!r}")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise invalid_parameter(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != out:
        raise invalid_parameter(f"{name} must be an integer, got {value!r}")
    return out


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise invalid_parameter(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise invalid_parameter(f"{name} must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise invalid_parameter(f"{name} must be finite, got {value!r}")
    return out


def sampling_params(fields: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """``max_tokens`` / ``temperature`` / ``top_p`` / ``top_k`` / ``seed`` checked against the limits."""
    raw_max = fields.get("max_tokens")
    if raw_max is None:
        raw_max = fields.get("max_completion_tokens")
    max_tokens = limits.default_max_tokens if raw_max is None else _int(raw_max, "max_tokens")
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise invalid_parameter(f"max_tokens must be in 1..{limits.max_tokens_limit}, got {max_tokens}")
    params: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": 0.0}
    if fields.get("temperature") is not None:
        t = _float(fields["temperature"], "temperature")
        if not 0 <= t <= 2:
            raise invalid_parameter(f"temperature must be in [0, 2], got {t}")
        params["temperature"] = t
    if fields.get("top_p") is not None:
        p = _float(fields["top_p"], "top_p")
        if not 0 < p <= 1:
            raise invalid_parameter(f"top_p must be in (0, 1], got {p}")
        params["top_p"] = p
    if fields.get("top_k") is not None:
        k = _int(fields["top_k"], "top_k")
        if k < 1:
            raise invalid_parameter(f"top_k must be >= 1, got {k}")
        params["top_k"] = k
    if fields.get("seed") is not None:
        params["seed"] = _int(fields["seed"], "seed")
    return params


def check_mode(mode: Any, default: str) -> str:
    if mode in (None, ""):
        return default
    if not isinstance(mode, str) or mode not in MODES:
        raise invalid_parameter(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    return mode


def check_prompt(prompt: Any, n_images: int = 1) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid_parameter("prompt must be a non-empty string")
    count = prompt.count(IMAGE_TOKEN)
    if count != n_images:
        raise invalid_parameter(f"prompt must contain {IMAGE_TOKEN} exactly {n_images} time(s), found {count}")
    return prompt


def parse_json_object(body: bytes) -> dict:
    """A JSON object from a request body (400 for empty, malformed or non-object JSON)."""
    if not body.strip():
        raise bad_request("the request body is empty; expected a JSON object", "invalid_json")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON: {exc}", "invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request(f"expected a JSON object, got {type(value).__name__}", "invalid_json")
    return value


# ------------------------------------------------------------------------ /v1/ocr
OCR_FIELDS = {"image_base64", "task", "prompt", "mode", "max_tokens", "temperature", "top_p", "top_k", "seed"}


def ocr_job(fields: Mapping[str, Any], image: bytes | None, default_mode: str, limits: Limits) -> Job:
    """A :class:`Job` from the fields of a JSON body, a form, or a query string."""
    unknown = set(fields) - OCR_FIELDS - {"file"}
    if unknown:
        raise invalid_parameter(f"unknown fields {sorted(unknown)}; known: {sorted(OCR_FIELDS | {'file'})}")
    if image is None:
        if fields.get("image_base64") in (None, ""):
            raise bad_request("no image: send a multipart `file` or a JSON `image_base64`", "missing_image")
        image = decode_base64_image(fields["image_base64"])
    task = fields.get("task")
    if task in (None, "") and fields.get("prompt") in (None, ""):
        task = "markdown"
    if task not in (None, "") and task not in TASK_PROMPTS:
        raise invalid_parameter(f"unknown task {task!r}; choose one of {sorted(TASK_PROMPTS)}")
    if fields.get("prompt") not in (None, ""):
        prompt = check_prompt(fields["prompt"])
    elif "prompt" in fields:
        raise invalid_parameter("prompt must be a non-empty string")
    else:
        prompt = TASK_PROMPTS[task]
    return Job(prompt=prompt, images=[image], mode=check_mode(fields.get("mode"), default_mode),
               params=sampling_params(fields, limits), task=task or None)


def ocr_response(job: Job, result: dict, image_size: tuple[int, int], model: str, timings: dict) -> dict:
    """``{text, markdown, boxes, usage, timings, ...}`` with boxes in 0..999 and in pixels."""
    text = result["text"]
    parsed = parse_grounding(text).to_pixels(*image_size)
    usage = result["usage"]
    return {
        "text": text,
        "markdown": to_markdown(text),
        "boxes": [{"label": b.label, "box": list(b.box), "box_px": list(b.box_px)} for b in parsed.boxes],
        "usage": {"image_tokens": usage["image_tokens"], "output_tokens": usage["output_tokens"],
                  "prompt_tokens": usage["prompt_tokens"]},
        "finish_reason": result["finish_reason"],
        "task": job.task,
        "mode": job.mode,
        "model": model,
        "image_size": list(image_size),
        "warnings": parsed.warnings,
        "timings": timings,
    }


# ------------------------------------------------------------------------ chat completions
CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
               "temperature", "top_p", "top_k", "seed", "n", "mode", "user", "stop", "presence_penalty",
               "frequency_penalty"}


def _image_part_bytes(part: Mapping[str, Any]) -> bytes:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, Mapping) else ref
    if not isinstance(url, str) or not url:
        raise bad_request("an image_url part needs image_url.url (a data: URI)")
    if not url.startswith("data:"):
        raise bad_request("image_url must be a data:<mime>;base64,... URI; the service does not fetch URLs")
    return decode_base64_image(url, "image_url")


def chat_job(body: Mapping[str, Any], default_mode: str, limits: Limits) -> Job:
    """OpenAI chat request -> :class:`Job`. User messages become the plain-template prompt:
    content parts in order, an image as ``<image>``, joined by newlines (so ``[image, "Free OCR."]``
    is exactly DeepSeek-OCR's ``"<image>\\nFree OCR."``). System messages are ignored."""
    unknown = set(body) - CHAT_FIELDS
    if unknown:
        raise invalid_parameter(f"unsupported fields {sorted(unknown)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list")
    if body.get("n") not in (None, 1):
        raise invalid_parameter("only n=1 is supported")
    parts: list[str] = []
    images: list[bytes] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise bad_request(f"messages[{i}] must be an object with a role")
        role = msg["role"]
        if role in ("system", "developer"):
            continue
        if role != "user":
            raise invalid_parameter(f"messages[{i}]: role {role!r} is not supported (single-turn OCR: user messages only)")
        content = msg.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(items):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad_request(f"messages[{i}].content[{j}].text must be a string")
                if IMAGE_TOKEN in text:
                    raise invalid_parameter(f"messages[{i}]: text must not contain {IMAGE_TOKEN}; send images as image_url parts")
                if text:
                    parts.append(text)
            elif kind == "image_url":
                images.append(_image_part_bytes(part))
                parts.append(IMAGE_TOKEN)
            else:
                raise bad_request(f"messages[{i}].content[{j}]: unsupported part type {kind!r} (text, image_url)")
    if not images:
        raise bad_request("no image: add an image_url part (data: URI) to a user message", "missing_image")
    if len(images) > limits.max_images:
        raise invalid_parameter(f"{len(images)} images; at most {limits.max_images} per request")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_parameter("stream must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise invalid_parameter("stream_options must be an object")
    return Job(prompt="\n".join(parts), images=images, mode=check_mode(body.get("mode"), default_mode),
               params=sampling_params(body, limits),
               extra={"stream": stream, "include_usage": bool(options.get("include_usage"))})


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_response(cid: str, model: str, result: dict) -> dict:
    usage = result["usage"]
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "finish_reason": result["finish_reason"]}],
        "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["output_tokens"],
                  "total_tokens": usage["prompt_tokens"] + usage["output_tokens"]},
    }


def chat_chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None) -> str:
    """One server-sent event in OpenAI's ``chat.completion.chunk`` format."""
    chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(type: str, message: str) -> str:
    return f"data: {json.dumps({'error': {'type': type, 'message': message}})}\n\n"
