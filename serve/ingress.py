"""``OCRIngress``: the HTTP front door (FastAPI inside a Serve deployment).

Per request: check the API key, read the body under a byte limit, parse (multipart, JSON or a
raw image body), sniff and preprocess the image in a thread, then call the encoder and hand
its *response objects* to the decoder, so embeddings move encoder -> decoder through the
object store. Post-processing (markdown, boxes in pixels) happens here.

Every client mistake is an :class:`APIError` -> ``{"error": {"type", "message"}}`` with a 4xx;
an overloaded or restarting backend is a 503 with ``Retry-After``; a slow one a 504.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations.
import asyncio
import hmac
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.processor import ImageProcessor
from serve import protocol
from serve.checkpoints import checkpoint_meta, default_mode
from serve.errors import APIError, bad_request, error_body, overloaded, unavailable
from serve.images import preprocess, views_payload
from serve.settings import Limits

log = logging.getLogger("ray.serve")

app = FastAPI(title="nano-deepseek-ocr", version="0.1.0",
              description="DeepSeek-OCR-style OCR: POST /v1/ocr, OpenAI-compatible POST /v1/chat/completions")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body("invalid_request", str(exc.errors())), status_code=400)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise bad_request(f"invalid Content-Length {declared!r}") from None
        if declared_n > limit:
            raise APIError(413, "payload_too_large", f"the body is {declared_n} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    """(text fields, file bytes or None) of a multipart/form-data body already read into memory."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=32)
    except Exception as exc:  # malformed multipart, too many parts
        raise bad_request(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
    fields: dict[str, Any] = {}
    image = None
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # an UploadFile
            if key != "file":
                raise bad_request(f"unexpected file field {key!r}; send the image as `file`")
            image = await value.read()
        else:
            if key == "file":
                raise bad_request("`file` must be a file upload (multipart filename=...), not a text field")
            fields[key] = value
    return fields, image


@serve.deployment(name="OCRIngress")
@serve.ingress(app)
class OCRIngress:
    """Validates, preprocesses, and orchestrates encoder -> decoder for each request."""

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, checkpoint: str,
                 limits: dict | None = None, api_key: str | None = None, model_name: str | None = None) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.limits = Limits(**(limits or {}))
        self.limits.accepted_types = tuple(self.limits.accepted_types)
        self.api_key = api_key or os.environ.get("NDOCR_API_KEY") or None
        meta = checkpoint_meta(checkpoint)
        self.default_mode = default_mode(meta)
        self.model_name = model_name or os.path.basename(os.path.normpath(checkpoint))
        if self.model_name in ("final", ""):
            self.model_name = os.path.basename(os.path.dirname(os.path.normpath(checkpoint))) or "nano-deepseek-ocr"
        self.preset = (meta.get("model") or {}).get("preset", "custom")
        self._processors: dict[str, ImageProcessor] = {}
        self.started = int(time.time())

    # ------------------------------------------------------------------ helpers
    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                           {"WWW-Authenticate": "Bearer"})

    def _processor(self, mode: str) -> ImageProcessor:
        if mode not in self._processors:
            self._processors[mode] = ImageProcessor.from_mode(mode, max_pixels=self.limits.max_pixels)
        return self._processors[mode]

    async def _prepare(self, job: protocol.Job) -> tuple[list, tuple[int, int], float]:
        """Preprocess every image in a worker thread; (encoder responses, first image's size, ms)."""
        start = time.perf_counter()
        processor = self._processor(job.mode)
        processed = []
        for data in job.images:
            processed.append(await asyncio.to_thread(preprocess, data, processor, self.limits.accepted_types))
        ms = (time.perf_counter() - start) * 1000
        encoded = [self.encoder.encode.remote(views_payload(p)) for p in processed]
        return encoded, processed[0].orig_size, ms

    def _decoder_request(self, job: protocol.Job) -> dict:
        return {"prompt": job.prompt, "params": job.params}

    @staticmethod
    def _backend_error(exc: BaseException) -> APIError:
        while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None and exc.cause is not exc:
            exc = exc.cause  # the encoder's failure arrives wrapped in the decoder's argument resolution
        if isinstance(exc, BackPressureError):
            return overloaded(f"the service is at capacity ({exc}); retry shortly")
        if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
            return unavailable(f"a backend replica is restarting ({type(exc).__name__}); retry shortly")
        if isinstance(exc, RequestCancelledError):
            return APIError(499, "cancelled", "the request was cancelled")
        return APIError(500, "internal_error", f"backend failure: {type(exc).__name__}: {exc}")

    async def _run(self, job: protocol.Job, deadline: float) -> tuple[dict, tuple[int, int], float]:
        """Encoder -> decoder (non-streamed) under the request deadline; the decoder's "done" event."""
        encoded, size, prep_ms = await self._prepare(job)
        response = self.decoder.generate.remote(self._decoder_request(job), *encoded)
        try:
            result = await asyncio.wait_for(response, timeout=max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            response.cancel()
            raise APIError(504, "timeout", f"no result within {self.limits.request_timeout_s:g} s") from None
        except APIError:
            raise
        except Exception as exc:
            raise self._backend_error(exc) from None
        if result.get("type") == "error":
            raise APIError(result.get("status", 400), result["error"]["type"], result["error"]["message"])
        return result, size, prep_ms

    # ------------------------------------------------------------------ routes
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.started,
                                            "owned_by": "nano-deepseek-ocr", "preset": self.preset,
                                            "default_mode": self.default_mode}]}

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        """One encoder and one decoder replica's counters (the encoder's batch sizes show batching)."""
        self._authorize(request)
        try:
            enc, dec = await asyncio.gather(self.encoder.get_stats.remote(), self.decoder.get_stats.remote())
        except Exception as exc:
            raise self._backend_error(exc) from None
        return {"encoder": enc, "decoder": dec}

    @app.post("/v1/ocr")
    async def ocr(self, request: Request) -> dict:
        deadline = time.monotonic() + self.limits.request_timeout_s
        start = time.perf_counter()
        self._authorize(request)
        body = await read_body(request, self.limits.max_body_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            fields, image = await parse_form(request, body)
        elif ctype in ("application/json", "") or ctype.endswith("+json"):
            fields, image = protocol.parse_json_object(body), None
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            fields, image = dict(request.query_params), body  # raw image body, options in the query
        else:
            raise APIError(415, "unsupported_media_type",
                           f"Content-Type {ctype!r}: use multipart/form-data, application/json or a raw image body")
        job = protocol.ocr_job(fields, image, self.default_mode, self.limits)
        result, size, prep_ms = await self._run(job, deadline)
        timings = {"preprocess_ms": round(prep_ms, 3), **result["timings"],
                   "total_ms": round((time.perf_counter() - start) * 1000, 3)}
        return protocol.ocr_response(job, result, size, self.model_name, timings)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        deadline = time.monotonic() + self.limits.request_timeout_s
        self._authorize(request)
        body = protocol.parse_json_object(await read_body(request, self.limits.max_body_bytes))
        job = protocol.chat_job(body, self.default_mode, self.limits)
        cid = protocol.completion_id()
        if not job.extra["stream"]:
            result, _, _ = await self._run(job, deadline)
            return protocol.chat_response(cid, self.model_name, result)
        encoded, _, _ = await self._prepare(job)
        gen = self.decoder.options(stream=True).stream.remote(self._decoder_request(job), *encoded)
        try:  # the first event decides the status code: a bad prompt is still a clean 4xx
            first = await asyncio.wait_for(gen.__anext__(), timeout=max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            gen.cancel()
            raise APIError(504, "timeout", f"no result within {self.limits.request_timeout_s:g} s") from None
        except StopAsyncIteration:
            raise APIError(500, "internal_error", "the decoder ended the stream without a result") from None
        except Exception as exc:
            raise self._backend_error(exc) from None
        if first.get("type") == "error":
            raise APIError(first.get("status", 400), first["error"]["type"], first["error"]["message"])
        return StreamingResponse(self._sse(cid, job, first, gen, deadline), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, cid: str, job: protocol.Job, first: dict, gen, deadline: float) -> AsyncIterator[str]:
        created = int(time.time())
        yield protocol.chat_chunk(cid, self.model_name, created, {"role": "assistant", "content": ""})
        event: dict | None = first
        try:
            while event is not None:
                kind = event.get("type")
                if kind == "delta":
                    yield protocol.chat_chunk(cid, self.model_name, created, {"content": event["text"]})
                elif kind == "done":
                    yield protocol.chat_chunk(cid, self.model_name, created, {}, event["finish_reason"])
                    if job.extra.get("include_usage"):
                        u = event["usage"]
                        yield protocol.chat_chunk(cid, self.model_name, created, {}, usage={
                            "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["output_tokens"],
                            "total_tokens": u["prompt_tokens"] + u["output_tokens"]})
                    break
                elif kind == "error":
                    yield protocol.sse_error(event["error"]["type"], event["error"]["message"])
                    break
                try:
                    event = await asyncio.wait_for(gen.__anext__(), timeout=max(0.001, deadline - time.monotonic()))
                except StopAsyncIteration:
                    event = None
                except asyncio.TimeoutError:
                    yield protocol.sse_error("timeout", f"no result within {self.limits.request_timeout_s:g} s")
                    break
                except Exception as exc:
                    err = self._backend_error(exc)
                    yield protocol.sse_error(err.type, err.message)
                    break
            yield protocol.SSE_DONE
        finally:
            gen.cancel()  # client gone or stream over: free the decoder row
