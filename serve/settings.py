"""The application's arguments (``build_app(args)``, ``serve/config.yaml``) as checked dataclasses.

Shape of ``args`` (every key optional)::

    checkpoint: path | latest        # default: newest stage-2 checkpoint under artifacts_dir
    artifacts_dir: artifacts
    device: auto | cpu | cuda        # encoder and decoder replicas
    dtype: auto | float32 | bfloat16
    api_key: null                    # or set NDOCR_API_KEY in the replicas' environment
    model_name: null                 # what /v1/models reports (default: checkpoint dir name)
    torch_threads: null              # intra-op threads per replica (CPU serving)
    limits: {max_body_bytes, max_pixels, accepted_types, request_timeout_s,
             default_max_tokens, max_tokens_limit, max_images}
    deployments:
      OCRIngress | VisionEncoder | TextDecoder:
        num_replicas, autoscaling_config, num_cpus, num_gpus, max_ongoing_requests,
        max_queued_requests, backpressure_config, health_check_period_s, health_check_timeout_s, ...
        VisionEncoder only: max_batch_size, batch_wait_timeout_s
        TextDecoder only:   max_batch_size (rows of the running batch), max_seq_len

Unknown keys are errors that name the key, so a typo in a manifest fails at deploy time.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from serve.images import KNOWN_TYPES

DEPLOYMENTS = ("OCRIngress", "VisionEncoder", "TextDecoder")
# Options handed to Deployment.options(...) unchanged.
_SERVE_OPTIONS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                  "backpressure_config",
                  "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s",
                  "graceful_shutdown_wait_loop_s", "max_replicas_per_node")
# Options that go into ray_actor_options.
_ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "runtime_env")
# Options the deployment's own constructor takes.
_OWN_OPTIONS = {
    "OCRIngress": (),
    "VisionEncoder": ("max_batch_size", "batch_wait_timeout_s"),
    "TextDecoder": ("max_batch_size", "max_seq_len"),
}

# A full queue answers 503 + Retry-After (the proxy does it for the ingress; the ingress maps the
# encoder's/decoder's BackPressureError the same way).
_BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}
# CPU shares sum to 2 so the whole service fits a 2-core laptop's local Ray.
DEFAULT_DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "OCRIngress": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 256, "max_queued_requests": 512,
                   "backpressure_config": _BACKPRESSURE},
    "VisionEncoder": {"num_replicas": 1, "num_cpus": 0.5, "num_gpus": 0, "max_ongoing_requests": 64,
                      "max_queued_requests": 256, "backpressure_config": _BACKPRESSURE,
                      "max_batch_size": 16, "batch_wait_timeout_s": 0.02},
    "TextDecoder": {"num_replicas": 1, "num_cpus": 1, "num_gpus": 0, "max_ongoing_requests": 128,
                    "max_queued_requests": 512, "backpressure_config": _BACKPRESSURE,
                    "max_batch_size": 32, "max_seq_len": None,
                    "health_check_period_s": 2.0, "health_check_timeout_s": 30.0},
}


@dataclass
class Limits:
    """Guards against expensive or hostile requests."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    accepted_types: tuple[str, ...] = KNOWN_TYPES
    request_timeout_s: float = 300.0
    default_max_tokens: int = 2048
    max_tokens_limit: int = 8192
    max_images: int = 4  # images per chat request

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "default_max_tokens", "max_tokens_limit", "max_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"limits.request_timeout_s must be > 0, got {self.request_timeout_s}")
        unknown = set(self.accepted_types) - set(KNOWN_TYPES)
        if unknown:
            raise ValueError(f"limits.accepted_types has unknown types {sorted(unknown)}; known: {list(KNOWN_TYPES)}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens_limit")


@dataclass
class Settings:
    """Everything ``build_app`` needs; ``checkpoint`` is resolved to an absolute path by the builder."""

    checkpoint: str | None = None
    artifacts_dir: str = "artifacts"
    device: str = "auto"
    dtype: str = "auto"
    api_key: str | None = None
    model_name: str | None = None
    torch_threads: int | None = None
    limits: Limits = field(default_factory=Limits)
    deployments: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_DEPLOYMENTS))

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "Settings":
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(known)}")
        limits_in = dict(args.pop("limits", None) or {})
        limit_names = {f.name for f in dataclasses.fields(Limits)}
        bad = set(limits_in) - limit_names
        if bad:
            raise ValueError(f"unknown limits {sorted(bad)}; known: {sorted(limit_names)}")
        if "accepted_types" in limits_in:
            limits_in["accepted_types"] = tuple(limits_in["accepted_types"])
        limits = Limits(**limits_in)
        limits.validate()
        deployments = copy.deepcopy(DEFAULT_DEPLOYMENTS)
        for name, opts in (args.pop("deployments", None) or {}).items():
            if name not in DEPLOYMENTS:
                raise ValueError(f"unknown deployment {name!r}; the application has {list(DEPLOYMENTS)}")
            merged = {**deployments[name], **(opts or {})}
            if opts and "autoscaling_config" in opts and "num_replicas" not in opts:
                merged.pop("num_replicas", None)  # an autoscaled deployment has no fixed count
            deployments[name] = merged
        for name, opts in deployments.items():
            allowed = set(_SERVE_OPTIONS) | set(_ACTOR_OPTIONS) | set(_OWN_OPTIONS[name])
            bad = set(opts) - allowed
            if bad:
                raise ValueError(f"deployments.{name}: unknown options {sorted(bad)}; allowed: {sorted(allowed)}")
            if opts.get("autoscaling_config") and isinstance(opts.get("num_replicas"), int):
                raise ValueError(f"deployments.{name}: give num_replicas or autoscaling_config, not both")
        return cls(limits=limits, deployments=deployments, **args)

    def serve_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (replicas, autoscaling, queues, resources)."""
        opts = self.deployments[name]
        out = {k: opts[k] for k in _SERVE_OPTIONS if opts.get(k) is not None}
        actor = {k: opts[k] for k in _ACTOR_OPTIONS if opts.get(k) is not None}
        if actor:
            out["ray_actor_options"] = actor
        return out

    def own_options(self, name: str) -> dict[str, Any]:
        """The deployment-specific settings its constructor takes (batch sizes, sequence length)."""
        opts = self.deployments[name]
        return {k: opts[k] for k in _OWN_OPTIONS[name] if k in opts}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
