"""``ray job submit`` of stage 1 against a real head started with ``ray start --head``.

The head runs in its own process group (``--block``) and is stopped by signalling that group,
never with ``ray stop`` (which would kill every Ray process on the machine, including the
session's in-process cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from free_ports import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_TMPDIR=str(tmp / "ray"))
    (tmp / "ray").mkdir(exist_ok=True)
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    from pipeline.preprocess import PreprocessConfig, run_preprocess
    from pipeline.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("jobsubmit")
    manifest = generate(root / "pages", 3, SynthConfig.easy(tasks=("free",)), seed=5)
    run_preprocess(PreprocessConfig(manifests=[str(manifest)], out=str(root / "shards"), mode="tiny",
                                    preset="tiny", vocab_size=512, max_seq_len=1024))
    return root


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = Path("/tmp") / f"ndocr-head-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    env = _env(tmp)
    gcs, dash, agent_http, agent_grpc, metrics = free_ports(5)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         # own agent ports: the session's in-process Ray already holds the default ones
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}",
         f"--temp-dir={tmp / 'ray'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    import httpx

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError("the Ray head's job server did not come up within 90 s")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # a graceful stop of this throwaway head took ~35 s; its whole process group goes after 5
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)  # the head's sessions, logs and store: ~MBs a run


def test_stage1_through_ray_job_submit_logs_the_loss(head, shards):
    address, env = head
    runtime_env = {"excludes": [".venv", ".git", "artifacts", ".gpu", ".fonts", "*.egg-info"],
                   "env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/stage1.py", "--config", "jobs/configs/stage1_tiny.yaml",
           "--data", str(shards / "shards"), "--out", str(shards / "runs"), "--steps", "3",
           "--batch-size", "1", "--run-name", "submitted", "--checkpoint-every", "0"]
    for _ in range(24):  # the job agent can come up a few seconds after the dashboard answers
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        logs = done.stdout + done.stderr
        if done.returncode == 0 or "No available agent" not in logs:
            break
        time.sleep(5)
    assert done.returncode == 0, logs[-4000:]
    assert logs.count("stage1 step 3/3 loss") == 1, logs[-4000:]  # once: Ray Train's print patch doubled it
    assert "succeeded" in logs.lower()
    assert (shards / "runs" / "submitted" / "final" / "model.safetensors").is_file()
