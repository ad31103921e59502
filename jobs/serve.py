"""Start the OCR service (Ray Serve) and block until Ctrl-C.

    python jobs/serve.py                                  # latest stage-2 checkpoint, 127.0.0.1:8000
    python jobs/serve.py --checkpoint artifacts/runs/stage2-tiny/final --port 8080
    python jobs/serve.py --config serve/config.yaml       # args + http_options of a Serve config
    python jobs/serve.py --smoke                          # one request to itself, then exit 0

With ``--address`` / ``RAY_ADDRESS`` (what ``ray job submit`` sets) it deploys onto that cluster
instead of a local Ray; add ``--detach`` to return once the application is up.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import init_ray

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def load_config(path: str | None) -> tuple[dict, dict]:
    """(application args, http_options) from a Serve config file (first application)."""
    if not path:
        return {}, {}
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    apps = cfg.get("applications") or []
    if not apps:
        raise SystemExit(f"{path}: no applications in this Serve config")
    return dict(apps[0].get("args") or {}), dict(cfg.get("http_options") or {})


def smoke_image() -> bytes:
    """A small page with a few lines of text, PNG-encoded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(["# Smoke test", "The quick brown fox", "jumps over the lazy dog."]):
        draw.text((12, 16 + 36 * i), line, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def smoke(url: str, api_key: str | None, timeout: float = 120.0) -> dict:
    """POST one image to /v1/ocr; raises on anything but 200."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    files = {"file": ("smoke.png", smoke_image(), "image/png")}
    response = httpx.post(f"{url}/v1/ocr", files=files, data={"task": "free", "max_tokens": "16"},
                          headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"smoke request failed: HTTP {response.status_code} {response.text[:500]}")
    return response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint directory (default: newest stage-2 under ./artifacts)")
    parser.add_argument("--config", help="a Serve config file (e.g. serve/config.yaml): its args and http_options")
    parser.add_argument("--host", help=f"bind address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--api-key", dest="api_key", help="require Authorization: Bearer KEY (default: NDOCR_API_KEY)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local in-process Ray)")
    parser.add_argument("--smoke", action="store_true", help="send one request to the service, print it, exit")
    parser.add_argument("--detach", action="store_true",
                        help="with --address: deploy and return; the application keeps running on the cluster")
    args = parser.parse_args(argv)

    remote = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if args.detach and not remote:
        parser.error("--detach needs a cluster (--address or RAY_ADDRESS): a local Ray ends with this process")
    app_args, http = load_config(args.config)
    for key in ("checkpoint", "device", "api_key"):
        if getattr(args, key):
            app_args[key] = getattr(args, key)
    host = args.host or http.get("host") or DEFAULT_HOST
    port = args.port or http.get("port") or DEFAULT_PORT

    from model.weights import CheckpointError
    from serve.app import APP_NAME, build_app

    try:
        app = build_app(app_args)  # resolves the checkpoint first: a clear error before Ray starts
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ray import serve

    init_ray(args.address)
    serve.start(http_options={"host": host, "port": port,
                              **({"request_timeout_s": http["request_timeout_s"]} if "request_timeout_s" in http else {})})
    start = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}"
    print(f"OCR service ready at {url} after {time.perf_counter() - start:.1f} s "
          f"(POST /v1/ocr, POST /v1/chat/completions, GET /healthz)", flush=True)

    if args.smoke:
        try:
            result = smoke(url, app_args.get("api_key") or os.environ.get("NDOCR_API_KEY"))
            print(json.dumps({k: result[k] for k in ("text", "usage", "timings", "mode", "model")}, indent=2))
            return 0
        except Exception as exc:
            print(f"smoke failed: {exc}", file=sys.stderr)
            return 1
        finally:
            serve.delete(APP_NAME)
            if not remote:
                serve.shutdown()
    if args.detach:
        print(f"deployed application {APP_NAME!r}; remove it with `serve shutdown` or serve.delete({APP_NAME!r})")
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
