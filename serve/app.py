"""The Serve application builder: ``serve.app:build_app`` (the import path Serve configs and the
KubeRay RayService manifest use).

    serve run serve/config.yaml                      # a Serve config file with args
    serve run serve.app:build_app checkpoint=PATH    # or args on the command line

Three deployments, each with its own replicas / autoscaling / resources from ``args``:
``OCRIngress`` (HTTP) -> ``VisionEncoder`` (batched) -> ``TextDecoder`` (continuous batching).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.checkpoints import resolve_checkpoint
from serve.decoder import TextDecoder
from serve.encoder import VisionEncoder
from serve.ingress import OCRIngress
from serve.settings import Settings

APP_NAME = "ocr"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Bind the three deployments for ``args`` (see :mod:`serve.settings` for the keys).

    The checkpoint is resolved here (``latest`` -> newest stage-2 checkpoint under
    ``artifacts_dir``) so a missing one fails the deploy with a clear message, not every replica.
    """
    settings = Settings.from_args(args)
    checkpoint = str(resolve_checkpoint(settings.checkpoint, settings.artifacts_dir))
    common = {"checkpoint": checkpoint, "device": settings.device, "dtype": settings.dtype,
              "torch_threads": settings.torch_threads}
    encoder = VisionEncoder.options(**settings.serve_options("VisionEncoder")).bind(
        **common, **settings.own_options("VisionEncoder"))
    decoder = TextDecoder.options(**settings.serve_options("TextDecoder")).bind(
        **common, **settings.own_options("TextDecoder"))
    limits = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.to_dict()["limits"].items()}
    return OCRIngress.options(**settings.serve_options("OCRIngress")).bind(
        encoder, decoder, checkpoint=checkpoint, limits=limits, api_key=settings.api_key,
        model_name=settings.model_name)
