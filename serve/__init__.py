"""Ray Serve OCR service: ``OCRIngress`` (HTTP) -> ``VisionEncoder`` -> ``TextDecoder``.

Build the application with ``serve.app:build_app`` (Serve config: serve/config.yaml; local
runner: jobs/serve.py). Modules import Ray lazily where they can; ``decode_loop``,
``protocol``, ``images`` and ``settings`` do not import Ray at all.
"""
