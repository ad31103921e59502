"""Shared plumbing for the ``jobs/*.py`` entry points (``python jobs/X.py`` or ``ray job submit``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
JOBS_DIR = REPO_ROOT / "jobs"


def job_sys_path(path: list[str], script: str) -> list[str]:
    """``sys.path`` for a job script: the repo root first, and without ``jobs/`` itself.

    Why drop ``jobs/``: Ray copies the driver script's directory (when it is on ``sys.path``) onto
    every worker's ``sys.path``, ahead of the repo root when the job starts from another working
    directory, and there ``jobs/serve.py`` shadows the ``serve`` package: Serve replicas fail with
    "'serve' is not a package". Imported from anywhere but a script in ``jobs/`` (tests), only the
    repo root is added.
    """
    is_job = bool(script) and Path(script).resolve().parent == JOBS_DIR
    kept = [p for p in path if not (is_job and p and Path(p).resolve() == JOBS_DIR)]
    return kept if str(REPO_ROOT) in kept else [str(REPO_ROOT), *kept]


sys.path[:] = job_sys_path(sys.path, sys.argv[0] if sys.argv else "")  # runnable from any working directory


# The project's switches that workers read from their environment: the kernel paths (NANO_OCR_*, see
# model/sam.py and model/gpt.py) and the fonts the synthetic pages are drawn with. A worker inherits its
# node's raylet's environment, not the driver's, so on a cluster a switch set for the job would not reach
# the workers that train or render. Secrets (NDOCR_API_KEY) are not forwarded: a job's runtime env is
# shown in the dashboard.
WORKER_ENV_PREFIXES = ("NANO_OCR_",)
WORKER_ENV_NAMES = ("NDOCR_FONT_DIR",)


def job_runtime_env(environ: Mapping[str, str] = os.environ) -> dict:
    """The runtime env of a job's workers: the repo on ``PYTHONPATH`` and the project's switches set here."""
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))}
    env_vars.update({k: v for k, v in environ.items()
                     if v and (k.startswith(WORKER_ENV_PREFIXES) or k in WORKER_ENV_NAMES)})
    return {"env_vars": env_vars}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``--address`` / ``RAY_ADDRESS`` (what ``ray job submit`` sets), else start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    env = job_runtime_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # With the dashboard when its packages are there (include_dashboard=None): it serves the State
        # API, which Ray Train's placement-group cleaner polls every second; without it every poll
        # logged a warning (hundreds per run), and the dashboard at :8265 shows the job as it runs.
        ray.init(num_cpus=num_cpus, include_dashboard=None, runtime_env=env)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Flags common to both stages; each overrides the YAML value of the same name."""
    parser.add_argument("--config", help="YAML file of TrainConfig fields (jobs/configs/...)")
    parser.add_argument("--preset", choices=["tiny", "small", "full"])
    parser.add_argument("--data", nargs="+", help="shard directories (local or s3://)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: beside the first shard dir)")
    parser.add_argument("--out", help="Ray Train storage path (local or s3://)")
    parser.add_argument("--run-name", dest="run_name")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--parent-run-id", dest="parent_run_id", help="MLflow parent (pipeline) run")
    parser.add_argument("--num-workers", dest="num_workers", type=int)
    parser.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--grad-accum", dest="grad_accum", type=int)
    parser.add_argument("--seq-len", dest="seq_len", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--optimizer", choices=["adamw", "muon"])
    parser.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    parser.add_argument("--max-failures", dest="max_failures", type=int)
    parser.add_argument("--resume-from", dest="resume_from", help="checkpoint dir: weights + optimizer + step")
    parser.add_argument("--export-dir", dest="export_dir", help="copy the final checkpoint here")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local in-process Ray)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="any TrainConfig field, VALUE read as YAML (repeatable): --set profile_at=100")


TRAIN_FIELDS = ("preset", "data", "tokenizer", "out", "run_name", "experiment", "parent_run_id", "num_workers",
                "use_gpu", "strategy", "steps", "batch_size", "grad_accum", "seq_len", "lr", "optimizer",
                "checkpoint_every", "max_failures", "resume_from", "export_dir")


def train_overrides(args: argparse.Namespace) -> dict:
    return {**{k: getattr(args, k, None) for k in TRAIN_FIELDS}, **parse_settings(getattr(args, "settings", []))}


def parse_settings(pairs: list[str]) -> dict:
    """``["profile_at=100", "betas=[0.9, 0.99]"]`` -> a dict of YAML-typed values (``--set`` flags)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out
