"""Job scripts run from any working directory, never hand ``jobs/`` to Ray's workers (where
``jobs/serve.py`` would shadow the ``serve`` package), and start a Ray that answers the State API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobs._common import JOBS_DIR, REPO_ROOT, job_runtime_env, job_sys_path


def test_a_job_script_drops_its_directory_and_puts_the_repo_root_first():
    script = str(JOBS_DIR / "speedrun.py")
    assert job_sys_path([str(JOBS_DIR), "/lib/python"], script) == [str(REPO_ROOT), "/lib/python"]
    assert job_sys_path([str(JOBS_DIR), str(REPO_ROOT), "/lib"], script) == [str(REPO_ROOT), "/lib"]
    # imported by anything else (tests, `python -m`): jobs/ stays where it was
    assert job_sys_path([str(JOBS_DIR), "/lib"], "/usr/bin/pytest") == [str(REPO_ROOT), str(JOBS_DIR), "/lib"]


def test_a_job_script_starts_from_another_directory(tmp_path):
    script = "speedrun.py"  # every job script begins with the same `import _common`
    # what `python jobs/<script> --help` does (its directory first on sys.path), then a look at sys.path
    probe = ("import runpy, sys; sys.argv = [{path!r}, '--help']; sys.path.insert(0, {jobs!r})\n"
             "try:\n    runpy.run_path({path!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "import serve.app, os\n"
             "assert {jobs!r} not in [os.path.abspath(p) for p in sys.path], sys.path\n"
             "print(serve.app.__file__)")
    code = probe.format(path=str(JOBS_DIR / script), jobs=str(JOBS_DIR))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and done.stdout.strip().endswith(str(REPO_ROOT / "serve" / "app.py"))


def test_a_job_started_ray_answers_the_state_api(tmp_path):
    """Ray Train's placement-group cleaner polls the State API every second; a job's in-process Ray
    without the dashboard that serves it logged a warning at each poll."""
    code = (f"import sys; sys.path.insert(0, {str(JOBS_DIR)!r})\n"
            "import _common\n"
            "_common.init_ray(num_cpus=1)\n"
            "import ray\n"
            "from ray.util.state import list_nodes\n"  # this Ray's, whatever else runs on the machine
            "print('nodes', len(list_nodes(address=ray.get_runtime_context().gcs_address)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_ADDRESS": ""})  # its own Ray, not a cluster
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nodes 1" in done.stdout


def test_a_jobs_workers_get_the_projects_switches_but_not_its_secrets():
    env = job_runtime_env({"NANO_OCR_SAM_GLOBAL_ATTENTION": "triton", "NDOCR_FONT_DIR": "/fonts",
                           "NDOCR_API_KEY": "secret", "NANO_OCR_DECODE_PDL": "", "HOME": "/root",
                           "PYTHONPATH": "/extra"})["env_vars"]
    assert env == {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), "/extra"]),
                   "NANO_OCR_SAM_GLOBAL_ATTENTION": "triton", "NDOCR_FONT_DIR": "/fonts"}


@pytest.mark.usefixtures("ray_local")
def test_a_switch_set_after_ray_started_reaches_workers_through_the_runtime_env(monkeypatch):
    """What a worker on another node sees: its raylet's environment, from before the switch was set."""
    import ray

    monkeypatch.setenv("NANO_OCR_SAM_GLOBAL_ATTENTION", "triton")

    @ray.remote(num_cpus=0)
    def switch() -> str | None:
        return os.environ.get("NANO_OCR_SAM_GLOBAL_ATTENTION")

    assert ray.get(switch.remote(), timeout=120) is None, "the cluster must predate the switch"
    assert ray.get(switch.options(runtime_env=job_runtime_env()).remote(), timeout=120) == "triton"
