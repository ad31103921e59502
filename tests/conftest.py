"""Shared fixtures: a tiny checkpoint (random weights, real tokenizer) and a local Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every cluster a test starts is a throwaway local one. Ray reads the auth mode once per process,
# so all of them (the shared local Ray, the autoscaling test's head, the job-submit head) must
# agree: token auth stays the production default (README), tests run with it off.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU the Triton decode kernels run in Triton's interpreter (tests/test_decode_kernels.py).
# Triton reads this when a kernel is defined, so before anything imports model.gpt.
if "TRITON_INTERPRET" not in os.environ and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"

SAMPLE_TEXT = [
    "Convert the document to markdown.", "Free OCR.", "Describe this image in detail.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "# Title\n\nA paragraph with <b>HTML</b> and a table <table><tr><td>1</td><td>2</td></tr></table>",
    "- item one\n- item two\n1. first\n2. second",
]


def build_tiny_checkpoint(directory: Path, mode: str = "tiny", seed: int = 0) -> Path:
    """A random-weight tiny-preset checkpoint with a tokenizer trained on a few strings."""
    import torch

    from model.config import preset
    from model.tokenizer import Tokenizer
    from model.vlm import NanoDeepseekOCR
    from model.weights import save_checkpoint

    tokenizer = Tokenizer.train(SAMPLE_TEXT * 4, vocab_size=512)
    config = preset("tiny")
    config.gpt.vocab_size = tokenizer.vocab_size
    config.image_token_id = tokenizer.token_id("<image>")
    torch.manual_seed(seed)
    model = NanoDeepseekOCR(config)
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits the head: give it something to say
        torch.nn.init.normal_(model.gpt.lm_head.weight, std=0.02)
    return save_checkpoint(directory, model, tokenizer=tokenizer, extra={"processor": {"mode": mode}})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _ensure_local_ray():
    import ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)  # never join a cluster another test left behind
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the shared local Ray (and Serve) down once, at the end of the session."""
    yield
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """The in-process local Ray that Ray Data / Train / Serve tests share.

    Started on first use and restarted (per module) if a test that runs its own cluster (the autoscaling
    test) shut it down in between.
    """
    return _ensure_local_ray()


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """Makes a fresh SQLite store in a directory and returns its URI, copied from a session
    template (creating the schema takes ~10 s)."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"

    def make(directory: Path) -> str:
        if not template.exists():
            from mlflow import MlflowClient

            template.parent.mkdir(parents=True, exist_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        db = directory / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, db)
        return f"sqlite:///{db}"

    return make


@pytest.fixture
def mlflow_uri(new_mlflow_store, tmp_path) -> str:
    """A fresh SQLite store per test."""
    return new_mlflow_store(tmp_path / "mlruns")
