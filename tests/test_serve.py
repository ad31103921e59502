"""The OCR service end to end: real Ray Serve on loopback, the tiny random-weight checkpoint, httpx.

One Serve application for the whole module (starting Serve costs ~10 s). The fast pure tests
(decode loop, parsing, settings) come first; the replica-kill test runs last.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from free_ports import free_ports
from model.tasks import TASK_PROMPTS

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 12
CONFIG_YAML = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def png_bytes(size=(96, 64), seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    else:
        img = Image.new(mode, size, 255)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed=1) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed=seed))).save(buf, format="JPEG")
    return buf.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ------------------------------------------------------------------ pure pieces (no Serve)
def test_decode_loop_matches_engine_and_joins_running_batch(tiny_checkpoint):
    """Requests arriving mid-generation join the running batch and still decode exactly as alone."""
    from model.engine import Engine, SamplingParams
    from model.processor import ImageProcessor
    from model.vlm import ImageViews
    from model.weights import load_checkpoint
    from serve.decode_loop import DecodeLoop, Detokenizer

    model, tok, _ = load_checkpoint(tiny_checkpoint)
    engine = Engine(model, tok)
    proc = ImageProcessor.from_mode("tiny")
    views = [ImageViews.from_processed(proc.process(png_bytes(seed=i))) for i in range(3)]
    prompts = [TASK_PROMPTS["free"], TASK_PROMPTS["describe"], TASK_PROMPTS["markdown"]]
    alone = [engine.generate_one(p, [v], max_new_tokens=10).text for p, v in zip(prompts, views)]
    vision = engine.encode_images(views)

    async def run():
        loop = DecodeLoop(model, tok.eos_id, capacity=2, max_len=256)
        first_running = asyncio.Event()

        async def one(i):
            if i:  # later requests arrive while the first one is mid-generation
                await first_running.wait()
            embeds, _ = engine.prompt_embeds(prompts[i], [vision[i]])
            pending = loop.submit(embeds, SamplingParams(max_new_tokens=10))
            detok, streamed = Detokenizer(tok), ""
            while True:
                ev = await pending.queue.get()
                if ev.finish_reason != "stop":
                    streamed += detok.push(ev.token_id)
                if i == 0 and len(detok.ids) == 2:
                    first_running.set()
                if ev.finished:
                    last, full = detok.finish()
                    return streamed + last, full

        out = await asyncio.gather(*(one(i) for i in range(3)))
        stats = loop.snapshot()
        await loop.close()
        return out, stats

    out, stats = asyncio.run(run())
    assert [full for _, full in out] == alone
    assert [streamed for streamed, _ in out] == alone
    assert stats["finished"] == 3 and stats["max_active"] == 2  # capacity respected
    assert stats["joined_running_batch"] >= 1


def test_decode_loop_cancel_frees_the_row_for_the_next_request(tiny_checkpoint):
    """A request cancelled mid-generation (client gone) sends nothing more, and its row, the only
    one, goes to the waiting request, which decodes exactly as alone."""
    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.processor import ImageProcessor
    from model.vlm import ImageViews
    from model.weights import load_checkpoint
    from serve.decode_loop import DecodeLoop

    model, tok, _ = load_checkpoint(tiny_checkpoint)
    engine = Engine(model, tok)
    proc = ImageProcessor.from_mode("tiny")
    views = [ImageViews.from_processed(proc.process(png_bytes(seed=i))) for i in range(2)]
    endless = SamplingParams(max_new_tokens=200, ngram_size=0, stop_ids=frozenset({-1}))  # only a cancel ends it
    short = SamplingParams(max_new_tokens=8, ngram_size=0)
    alone = engine.generate([GenerationRequest(TASK_PROMPTS["free"], [views[1]], params=short)])[0].token_ids
    vision = engine.encode_images(views)

    async def run():
        loop = DecodeLoop(model, tok.eos_id, capacity=1, max_len=512)
        first = loop.submit(engine.prompt_embeds(TASK_PROMPTS["describe"], [vision[0]])[0], endless)
        second = loop.submit(engine.prompt_embeds(TASK_PROMPTS["free"], [vision[1]])[0], short)
        got_first = [await first.queue.get() for _ in range(3)]
        queued = first.queue.qsize()  # dispatched before the cancel, not read yet
        loop.cancel(first)
        got_second = []
        while not got_second or not got_second[-1].finished:
            got_second.append(await asyncio.wait_for(second.queue.get(), 60))
        stats = loop.snapshot()
        leftover = first.queue.qsize() - queued
        await loop.close()
        return got_first, got_second, stats, leftover

    got_first, got_second, stats, leftover = asyncio.run(run())
    assert not any(ev.finished for ev in got_first) and leftover <= 1  # at most the step running at the cancel
    assert [ev.token_id for ev in got_second if ev.token_id != tok.eos_id] == alone
    assert stats["cancelled"] == 1 and stats["finished"] == 1 and stats["active"] == 0 and stats["max_active"] == 1


def test_sniffing_and_parsing():
    from serve.errors import APIError
    from serve.images import decode_base64_image, sniff_image_type
    from serve.protocol import chat_job, ocr_job, ocr_response
    from serve.settings import Limits

    assert sniff_image_type(png_bytes()) == "png"
    assert sniff_image_type(jpeg_bytes()) == "jpeg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image_type(b"<html>") is None
    assert decode_base64_image(data_uri(b"abc")) == b"abc"
    limits = Limits()
    job = ocr_job({"task": "free", "max_tokens": "5"}, b"x", "tiny", limits)
    assert job.prompt == TASK_PROMPTS["free"] and job.params["max_new_tokens"] == 5
    with pytest.raises(APIError) as err:
        ocr_job({"prompt": "<image><image>"}, b"x", "tiny", limits)
    assert err.value.status == 422
    chat = chat_job({"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(b"img")}}, {"type": "text", "text": "Free OCR."}]}]},
        "tiny", limits)
    assert chat.prompt == TASK_PROMPTS["free"] and chat.images == [b"img"]
    text = "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>\n# Hello"
    result = {"text": text, "finish_reason": "stop",
              "usage": {"image_tokens": 73, "output_tokens": 9, "prompt_tokens": 80}, "timings": {}}
    body = ocr_response(job, result, (200, 100), "m", {})
    assert body["boxes"] == [{"label": "title", "box": [0, 0, 999, 499], "box_px": [0, 0, 200, 49]}]
    assert body["markdown"] == "# Hello"


def test_settings_and_config_file(tiny_checkpoint, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app
    from serve.checkpoints import find_latest_checkpoint
    from serve.settings import Settings

    with open(CONFIG_YAML) as f:
        cfg = yaml.safe_load(f)
    ServeDeploySchema.model_validate(cfg)  # a valid Serve config file
    (app_cfg,) = cfg["applications"]
    assert app_cfg["import_path"] == "serve.app:build_app"
    settings = Settings.from_args(app_cfg["args"])
    assert "num_replicas" not in settings.serve_options("TextDecoder")
    assert settings.serve_options("TextDecoder")["autoscaling_config"]["max_replicas"] == 4
    assert build_app({**app_cfg["args"], "checkpoint": str(tiny_checkpoint)}) is not None
    with pytest.raises(ValueError, match="max_batch_sise"):
        Settings.from_args({"deployments": {"VisionEncoder": {"max_batch_sise": 4}}})
    with pytest.raises(ValueError, match="no stage-2 checkpoint"):
        build_app({"artifacts_dir": str(tmp_path / "empty")})
    # "latest": the newest runs/stage2-*/final wins; stage-1 checkpoints never do
    for age, run in enumerate(("stage2-old", "stage2-tiny", "stage1-tiny")):
        final = tmp_path / "artifacts" / "runs" / run / "final"
        shutil.copytree(tiny_checkpoint, final)
        for path in (final, final / "model.safetensors"):
            os.utime(path, (1e9 + age, 1e9 + age))
    assert find_latest_checkpoint(tmp_path / "artifacts") == (tmp_path / "artifacts/runs/stage2-tiny/final").resolve()


# ------------------------------------------------------------------ the live service
@pytest.fixture(scope="module")
def service(ray_local, tiny_checkpoint):
    import httpx
    from ray import serve

    from serve.app import build_app

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"num_cpus": 0.25, "num_gpus": 0}
    app = build_app({
        "checkpoint": str(tiny_checkpoint), "device": "cpu", "api_key": API_KEY, "torch_threads": 1,
        "limits": {"max_body_bytes": 1_000_000, "max_pixels": 4_000_000, "request_timeout_s": 60,
                   "default_max_tokens": MAX_TOKENS, "max_tokens_limit": 64},
        "deployments": {
            "OCRIngress": {**small},
            "VisionEncoder": {**small, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "TextDecoder": {**small, "max_batch_size": 16, "max_seq_len": 256, "health_check_period_s": 1},
        },
    })
    serve.run(app, name="ocr", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield client
    client.close()
    serve.delete("ocr")
    serve.shutdown()


def ocr(client, image=None, headers=AUTH, **fields):
    files = {"file": ("page.png", image if image is not None else png_bytes(), "image/png")}
    data = {"max_tokens": str(MAX_TOKENS), **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/ocr", files=files, data=data, headers=headers)


def chat_body(image: bytes, text="Free OCR.", **extra) -> dict:
    return {"model": "x", "max_tokens": MAX_TOKENS, "temperature": 0, **extra,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": text}]}]}


def test_each_task_returns_documented_json(service):
    assert service.get("/healthz").json()["status"] == "ok"
    models = service.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["default_mode"] == "tiny"
    for task in TASK_PROMPTS:
        r = ocr(service, task=task)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["text"], str) and isinstance(body["markdown"], str)
        assert isinstance(body["boxes"], list)
        for box in body["boxes"]:
            assert set(box) == {"label", "box", "box_px"}
        assert body["usage"]["image_tokens"] == 73  # tiny mode: 8 x 9 + 1 slots
        assert 1 <= body["usage"]["output_tokens"] <= MAX_TOKENS
        assert body["task"] == task and body["mode"] == "tiny"
        assert body["timings"]["total_ms"] > 0 and "decode_ms" in body["timings"]
    # JSON with base64, a raw prompt, another mode; and a raw image body with query options
    r = service.post("/v1/ocr", headers=AUTH, json={"image_base64": base64.b64encode(jpeg_bytes()).decode(),
                                                     "prompt": "<image>\nFree OCR.", "mode": "small", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["image_tokens"] == 111 and r.json()["usage"]["output_tokens"] <= 4
    r = service.post("/v1/ocr?task=free&max_tokens=4", content=png_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text


def test_chat_stream_reassembles_to_non_streamed_text(service):
    image = png_bytes(seed=7)
    plain = service.post("/v1/chat/completions", headers=AUTH, json=chat_body(image))
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "chat.completion"
    text = body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] >= 1
    # the chat prompt [image, "Free OCR."] is the free task's prompt: same greedy text
    assert ocr(service, image, task="free").json()["text"] == text

    chunks, done = [], False
    with service.stream("POST", "/v1/chat/completions", headers=AUTH,
                        json=chat_body(image, stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[len("data: "):]))
    assert done
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [body["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


def test_concurrent_requests_are_batched(service):
    import httpx

    async def burst():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=120, headers=AUTH) as client:
            async def one(i):
                files = {"file": ("p.png", png_bytes(seed=100 + i), "image/png")}
                return await client.post("/v1/ocr", files=files, data={"task": "free", "max_tokens": "8"})
            return await asyncio.gather(*(one(i) for i in range(32)))

    before = service.get("/v1/stats", headers=AUTH).json()
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    stats = service.get("/v1/stats", headers=AUTH).json()
    new_batches = stats["encoder"]["batch_sizes"][len(before["encoder"]["batch_sizes"]):]
    assert sum(new_batches) == 32
    assert max(new_batches) > 1, new_batches  # the encoder ran several images per forward
    assert stats["decoder"]["max_active"] > 1  # the decoder ran several requests per step


def test_bad_inputs_get_4xx_and_service_keeps_serving(service):
    png = png_bytes()
    cases = {
        "not an image": (ocr(service, b"hello, this is plain text, not a picture"), 415, "unsupported_media_type"),
        "truncated": (ocr(service, png[: len(png) // 2]), 400, "invalid_image"),
        "zero bytes": (ocr(service, b""), 400, "empty_image"),
        "oversized dimensions": (ocr(service, png_bytes((2100, 2100), mode="L")), 413, "image_too_large"),
        "oversized body": (ocr(service, b"\x89PNG\r\n\x1a\n" + bytes(1_100_000)), 413, "payload_too_large"),
        "malformed json": (service.post("/v1/ocr", content=b'{"task": "free",', headers={**AUTH, "Content-Type": "application/json"}), 400, "invalid_json"),
        "unknown task": (ocr(service, task="poetry"), 422, "invalid_parameter"),
        "unknown mode": (ocr(service, mode="huge"), 422, "invalid_parameter"),
        "bad prompt": (ocr(service, prompt="no image placeholder"), 422, "invalid_parameter"),
        "bad max_tokens": (ocr(service, max_tokens=10_000), 422, "invalid_parameter"),
        "missing image": (service.post("/v1/ocr", json={"task": "free"}, headers=AUTH), 400, "missing_image"),
        "bad base64": (service.post("/v1/ocr", json={"image_base64": "%%%"}, headers=AUTH), 400, "invalid_request"),
        "bad api key": (ocr(service, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized"),
        "no api key": (ocr(service, headers={}), 401, "unauthorized"),
        "chat url image": (service.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}), 400, "invalid_request"),
        "chat no image": (service.post("/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "hi"}]}), 400, "missing_image"),
        "unknown route": (service.get("/v1/nothing", headers=AUTH), 404, "not_found"),
    }
    for name, (response, status, kind) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert error["type"] == kind and error["message"], (name, error)
    assert cases["bad api key"][0].headers.get("www-authenticate") == "Bearer"
    r = ocr(service, task="free")
    assert r.status_code == 200, r.text


def test_killed_decoder_replica_is_replaced(service, ray_local):
    import ray

    before = service.get("/v1/stats", headers=AUTH).json()["decoder"]
    assert before["submitted"] > 0
    ray.kill(ray.get_actor(before["replica"], namespace="serve"), no_restart=False)
    deadline, status = time.monotonic() + 90, None
    while time.monotonic() < deadline:
        try:
            r = ocr(service, task="free")
            status = r.status_code
            if status == 200:
                break
            assert status in (500, 503), r.text  # a restarting backend is never a 4xx
        except Exception as exc:  # connection hiccups while the replica is replaced
            status = repr(exc)
        time.sleep(1)
    assert status == 200, status
    after = service.get("/v1/stats", headers=AUTH).json()["decoder"]
    assert after["submitted"] < before["submitted"]  # a fresh replica (its counters restarted)
