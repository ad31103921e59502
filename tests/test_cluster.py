"""Cluster configurations are tested, not just written.

* cluster/aws.yaml passes the Ray cluster launcher's own schema validation, after
  the same default fill-out `ray up` does.
* The KubeRay manifests carry the fields the operator needs, their Serve config
  passes Ray Serve's deploy schema, and their runtime envs pass Ray's parser.
* An autoscaling cluster on this machine (fake multi-node provider, worker types
  mirroring aws.yaml's single-GPU type, scaled down) starts GPU nodes for a Ray
  Train job whose workers ask for a GPU, and removes them once idle.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import AutoscalingCluster

from free_ports import free_ports

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"

# The serving node type of aws.yaml that the fake cluster mirrors, and the
# deployments the Serve app builder `serve.app:build_app` must expose.
SERVE_NODE_TYPE = "gpu_1x"
TRAIN_NODE_TYPE = "gpu_8x"
SERVE_IMPORT_PATH = "serve.app:build_app"
DEPLOYMENTS = {"OCRIngress": 0, "VisionEncoder": 0.5, "TextDecoder": 0.5}
# Flags that must reach every GPU process: no NVLink multicast (NVLS).
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def _load_yaml(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _load_all(path: Path) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# --------------------------------------------------------------------------- #
# cluster/aws.yaml
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def aws() -> Dict[str, Any]:
    return _load_yaml(CLUSTER / "aws.yaml")


def test_aws_yaml_passes_ray_validation(aws: Dict[str, Any]) -> None:
    # `ray up` fills out the provider defaults and merges setup commands
    # (prepare_config), then validates against ray-schema.json plus its own checks.
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # Fill-out as `ray up` does it: the head type gets max_workers 0.
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_aws_yaml_validation_rejects_a_broken_config(aws: Dict[str, Any]) -> None:
    # Guards the test above: validation must actually bite on this file's shape.
    import jsonschema

    broken = copy.deepcopy(aws)
    broken["available_node_types"][SERVE_NODE_TYPE]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(aws)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_aws_yaml_worker_types_scale_from_zero(aws: Dict[str, Any]) -> None:
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must be a CPU node"
    workers = {k: v for k, v in types.items() if k != aws["head_node_type"]}
    assert workers, "no worker types"
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, f"{name} must scale from zero"
        assert spec["max_workers"] >= 1, f"{name} can never be launched"
    assert sum(w["max_workers"] for w in workers.values()) <= aws["max_workers"]
    assert types[SERVE_NODE_TYPE]["resources"]["GPU"] == 1
    assert types[TRAIN_NODE_TYPE]["resources"]["GPU"] == 8
    assert aws["idle_timeout_minutes"] > 0


def test_aws_yaml_installs_the_project_and_starts_services(aws: Dict[str, Any]) -> None:
    setup = "\n".join(aws["setup_commands"])
    assert "pip install --no-cache-dir torch" in setup
    remote = next(r for r, local in aws["file_mounts"].items() if local == ".")
    assert f"pip install --no-cache-dir -e {remote}" in setup
    head = "\n".join(aws["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head and "--autoscaling-config=" in head
    assert "mlflow server" in head and "--port 5000" in head
    assert "--backend-store-uri sqlite:///" in head
    assert "--default-artifact-root s3://" in head
    for cmds in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, "every node must require the token"
        assert re.search(r"MLFLOW_TRACKING_URI=http://\$RAY_HEAD_IP:5000\b", start), start
    assert "/home/ray/.ray/auth_token" in aws["file_mounts"]
    for excluded in (".venv", "artifacts", ".gpu"):
        assert excluded in aws["rsync_exclude"]


# --------------------------------------------------------------------------- #
# cluster/runtime_env.yaml
# --------------------------------------------------------------------------- #


def test_runtime_env_yaml_is_a_valid_job_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    raw = _load_yaml(CLUSTER / "runtime_env.yaml")
    env = RuntimeEnv(**raw)  # Ray's own field validation
    assert env["working_dir"] == "."
    for pattern in ("artifacts/", ".venv/", ".gpu/"):
        assert pattern in env["excludes"]
    env_vars = env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values())
    # Passed through from the node environment, which both cluster kinds set.
    assert env_vars["MLFLOW_TRACKING_URI"] == "${MLFLOW_TRACKING_URI}"
    for key, value in NO_MULTICAST_ENV.items():
        assert env_vars[key] == value
    assert "pip" not in raw and "conda" not in raw, "the image already has the package"


# --------------------------------------------------------------------------- #
# cluster/kuberay/*.yaml
# --------------------------------------------------------------------------- #


def _kind(path: Path, kind: str) -> Dict[str, Any]:
    docs = [d for d in _load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    assert docs[0]["apiVersion"] == "ray.io/v1", path.name
    assert docs[0]["metadata"]["name"], path.name
    return docs[0]


def _container(pod_template: Dict[str, Any]) -> Dict[str, Any]:
    return pod_template["template"]["spec"]["containers"][0]


def _mlflow_service_uri() -> str:
    """The in-cluster URI of the MLflow Service in base.yaml."""
    (service,) = [d for d in _load_all(KUBERAY / "base.yaml") if d["kind"] == "Service"]
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def _env(container: Dict[str, Any]) -> Dict[str, Optional[str]]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _check_cluster_spec(spec: Dict[str, Any], aws: Dict[str, Any], where: str) -> None:
    """A RayClusterSpec: autoscaled, token auth, CPU head, worker groups from zero that
    match aws.yaml's node types (Ray sees the container limits as its resources)."""
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["authOptions"]["mode"] == "token", where
    head = _container(spec["headGroupSpec"])
    head_type = aws["available_node_types"][aws["head_node_type"]]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], where
    assert int(head["resources"]["limits"]["cpu"]) == head_type["resources"]["CPU"], where
    assert {6379, 8265, 8000} <= {p["containerPort"] for p in head["ports"]}, where
    assert _env(head)["MLFLOW_TRACKING_URI"] == _mlflow_service_uri(), where
    assert spec["workerGroupSpecs"], where
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        node_type = aws["available_node_types"][name.replace("-", "_")]
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, f"{where}/{name}"
        assert group["maxReplicas"] == node_type["max_workers"], f"{where}/{name}"
        container = _container(group)
        assert container["image"] == head["image"], f"{where}/{name}: image"
        assert _env(container)["MLFLOW_TRACKING_URI"] == _mlflow_service_uri(), f"{where}/{name}"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["cpu"]) == node_type["resources"]["CPU"], f"{where}/{name}: CPU"
        gpus = node_type["resources"].get("GPU", 0)
        assert int(limits.get("nvidia.com/gpu", 0)) == gpus, f"{where}/{name}: GPU limit"
        assert int(requests.get("nvidia.com/gpu", 0)) == gpus, f"{where}/{name}: GPU request"
        if gpus:
            for key, value in NO_MULTICAST_ENV.items():
                assert _env(container).get(key) == value, f"{where}/{name}: {key}"


@pytest.fixture(scope="module")
def raycluster(aws: Dict[str, Any]) -> Dict[str, Any]:
    return _kind(KUBERAY / "raycluster.yaml", "RayCluster")


def test_raycluster_manifest(raycluster: Dict[str, Any], aws: Dict[str, Any]) -> None:
    spec = raycluster["spec"]
    _check_cluster_spec(spec, aws, "raycluster.yaml")
    groups = {g["groupName"].replace("-", "_") for g in spec["workerGroupSpecs"]}
    workers = set(aws["available_node_types"]) - {aws["head_node_type"]}
    assert groups == workers, "one worker group per aws.yaml worker type"
    # The image is cluster/Dockerfile: aws.yaml's Ray image + torch + this package.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM {aws['docker']['image']}\n" in dockerfile
    assert "pip install --no-cache-dir torch" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile


def _same_as_raycluster(spec: Dict[str, Any], raycluster: Dict[str, Any], group: str) -> None:
    """Job and service clusters reuse raycluster.yaml's head and one of its groups verbatim."""
    reference = raycluster["spec"]
    assert spec["headGroupSpec"] == reference["headGroupSpec"]
    assert spec["authOptions"] == reference["authOptions"]
    assert spec["autoscalerOptions"] == reference["autoscalerOptions"]
    (own,) = spec["workerGroupSpecs"]
    assert own == next(g for g in reference["workerGroupSpecs"] if g["groupName"] == group)


def test_rayjob_stage1_manifest(raycluster: Dict[str, Any], aws: Dict[str, Any]) -> None:
    from ray.runtime_env import RuntimeEnv

    spec = _kind(KUBERAY / "rayjob-stage1.yaml", "RayJob")["spec"]
    prefix = "python jobs/stage1.py --config jobs/configs/stage1_full.yaml"
    assert spec["entrypoint"].startswith(prefix)
    # The job's config asks for GPU workers (1 GPU each) that the job's cluster can hold.
    job_config = _load_yaml(REPO / "jobs/configs/stage1_full.yaml")
    assert job_config["use_gpu"] is True
    gpu_slots = sum(
        int(_container(g)["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert 1 <= job_config["num_workers"] <= gpu_slots
    assert spec["shutdownAfterJobFinishes"] is True
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    _check_cluster_spec(spec["rayClusterSpec"], aws, "rayjob-stage1.yaml")
    _same_as_raycluster(spec["rayClusterSpec"], raycluster, group="gpu-8x")
    raw_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # working_dir is the project copy in the image (the submitter pod runs it).
    workdir = re.search(r"^WORKDIR (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert raw_env.pop("working_dir") == workdir.group(1)
    runtime_env = RuntimeEnv(**raw_env)  # Ray's own check of the remaining fields
    env_vars = runtime_env["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for key, value in NO_MULTICAST_ENV.items():
        assert env_vars[key] == value


def test_rayservice_manifest(raycluster: Dict[str, Any], aws: Dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    spec = _kind(KUBERAY / "rayservice.yaml", "RayService")["spec"]
    _check_cluster_spec(spec["rayClusterConfig"], aws, "rayservice.yaml")
    _same_as_raycluster(spec["rayClusterConfig"], raycluster, group="gpu-1x")
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    schema = ServeDeploySchema.parse_obj(serve_config)  # Ray Serve's own check
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    (app,) = schema.applications
    assert app.import_path == SERVE_IMPORT_PATH
    # The app's own argument parser (unknown keys are errors) and what it hands to
    # Deployment.options for each of the three deployments.
    from serve.settings import DEPLOYMENTS as APP_DEPLOYMENTS
    from serve.settings import Settings

    assert set(APP_DEPLOYMENTS) == set(DEPLOYMENTS)
    settings = Settings.from_args(app.args)
    for name, gpus in DEPLOYMENTS.items():
        options = settings.serve_options(name)
        scaling = options["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
        assert "num_replicas" not in options, f"{name}: autoscaled, no fixed count"
        assert options["ray_actor_options"].get("num_gpus", 0) == gpus, name
    # One gpu_1x node holds one encoder and one decoder replica.
    assert sum(DEPLOYMENTS.values()) <= aws["available_node_types"][SERVE_NODE_TYPE]["resources"]["GPU"]
    # `serve deploy` on the VM cluster uses the same document.
    assert _load_yaml(CLUSTER / "serve_config.yaml") == serve_config


def test_mlflow_server_accepts_the_tracking_uri_the_jobs_use() -> None:
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    kinds = {d["kind"]: d for d in _load_all(KUBERAY / "base.yaml")}
    assert {"ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service"} <= set(kinds)
    uri = _mlflow_service_uri()
    job = _kind(KUBERAY / "rayjob-stage1.yaml", "RayJob")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    args = dict(
        (a.lstrip("-").split("=", 1) + [""])[:2]
        for a in _container(kinds["Deployment"]["spec"])["args"]
    )
    assert args["backend-store-uri"].startswith("sqlite:////")
    allowed = args["allowed-hosts"].split(",")
    # MLflow's own host check (DNS-rebinding guard): in-cluster and port-forwarded.
    assert is_allowed_host_header(allowed, urlparse(uri).netloc)
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")


# --------------------------------------------------------------------------- #
# Autoscaling on this machine
# --------------------------------------------------------------------------- #


class LocalAutoscalingCluster(AutoscalingCluster):
    """An AutoscalingCluster whose config is built here and whose processes are its own.

    Ray's class reads fake_multi_node/example.yaml (missing from the wheel) and
    starts and stops with `ray stop --force`, which would kill every Ray process
    on the machine. This one starts `ray start --head --block` in a new session
    on free ports with a private temp dir, and tears down only that session's
    processes (the fake worker nodes are started by its autoscaler, inside it).
    """

    def __init__(
        self,
        head_resources: Dict[str, int],
        worker_node_types: Dict[str, Any],
        **config_kwargs: Any,
    ) -> None:
        self.node_ip = ray.util.get_node_ip_address()
        # the head's GCS, dashboard, client server and dashboard agent: distinct, or Ray refuses to start
        self.gcs_port, self._dashboard_port, self._client_port, self._agent_port = free_ports(4)
        self._process: Optional[subprocess.Popen] = None
        super().__init__(head_resources, worker_node_types, **config_kwargs)
        # Short (Unix socket paths), private, and the marker of this cluster's processes.
        self.temp_dir = tempfile.mkdtemp(prefix="ndocr-ray-", dir="/tmp")

    @property
    def address(self) -> str:
        return f"{self.node_ip}:{self.gcs_port}"

    def _generate_config(
        self,
        head_resources: Dict[str, int],
        worker_node_types: Dict[str, Any],
        autoscaler_v2: bool = False,
        **config_kwargs: Any,
    ) -> Dict[str, Any]:
        if autoscaler_v2:
            raise ValueError("the fake provider here is driven by the v1 autoscaler")
        types = copy.deepcopy(worker_node_types)
        types["ray.head.default"] = {
            "resources": dict(head_resources),
            "node_config": {},
            "max_workers": 0,
        }
        config = {
            "cluster_name": "ndocr-fake",
            "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 1.0,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": self.address,
            },
            "auth": {},
            "docker": {},
            "head_node_type": "ray.head.default",
            "available_node_types": types,
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        config.update(config_kwargs)
        validate_config(config)  # the monitor reads this file as is
        return config

    def start(self, _system_config: Optional[Dict] = None, override_env: Optional[Dict] = None) -> None:
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(self._config, f)
        resources = dict(self._head_resources)
        ray_cli = Path(sys.executable).with_name("ray")
        if not ray_cli.exists():
            raise FileNotFoundError(f"no `ray` CLI next to {sys.executable}")
        cmd = [
            str(ray_cli), "start", "--head", "--block",
            f"--node-ip-address={self.node_ip}",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_path}",
            f"--num-cpus={resources.pop('CPU', 1)}",
            f"--num-gpus={resources.pop('GPU', 0)}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self._dashboard_port}",
            f"--ray-client-server-port={self._client_port}",
            f"--dashboard-agent-listen-port={self._agent_port}",
            "--disable-usage-stats",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if _system_config:
            cmd.append(f"--system-config={json.dumps(_system_config)}")
        env = dict(
            os.environ,
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_FAKE_CLUSTER="1",
            # A throwaway head: on SIGTERM skip the node drain (up to 30 s by default,
            # and a finished Ray Train run leaves the head busy enough to use it all).
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        env.update(override_env or {})
        self._log = open(os.path.join(self.temp_dir, "ray-start.log"), "w+")
        self._process = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._log.seek(0)
            log = self._log.read()
            if "Ray runtime started" in log:
                return
            if self._process.poll() is not None:
                raise RuntimeError(f"ray start --head exited early:\n{log}")
            time.sleep(0.5)
        raise TimeoutError(f"ray start --head did not come up in 60 s:\n{log}")

    def head_exit_code(self) -> Optional[int]:
        """None while `ray start --block` runs; it exits (1) when any head process dies."""
        return self._process.poll() if self._process else None

    def start_log(self) -> str:
        """What `ray start --head` printed, which names a head process that died and why."""
        with open(os.path.join(self.temp_dir, "ray-start.log"), errors="replace") as f:
            return f.read()

    def _own_pids(self) -> List[int]:
        """Processes of this cluster: its session, or anything naming its temp dir (Linux /proc)."""
        sid = self._process.pid if self._process else None
        mine = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state == "Z":  # already dead, waiting for its parent to reap it
                    continue
                if (sid is not None and os.getsid(pid) == sid) or self.temp_dir in cmdline:
                    mine.append(pid)
            except (OSError, IndexError):
                continue
        return mine

    def _signal_and_wait(self, pids: List[int], sig: int, timeout: float) -> List[int]:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = set(self._own_pids()) & set(pids)
            if not alive:
                return []
            time.sleep(0.2)
        return sorted(set(self._own_pids()) & set(pids))

    def shutdown(self) -> None:
        """Stop the head gracefully, then end whatever of this cluster is left, by pid."""
        try:
            # SIGTERM to `ray start --block` stops the head's processes in order (~4 s,
            # no node drain: see start()); signalling them all at once instead
            # leaves the GCS hanging for > 30 s.
            if self._process is not None and self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            # Then anything left of this cluster (e.g. a fake worker node not yet
            # scaled down): SIGTERM, and SIGKILL after a grace period, like `ray stop`.
            alive = self._signal_and_wait(self._own_pids(), signal.SIGTERM, timeout=15)
            self._signal_and_wait(alive, signal.SIGKILL, timeout=10)
            if self._process is not None:
                self._process.wait(timeout=10)
            # Anything found now appeared during shutdown or ignored SIGKILL: end it, and fail.
            leftover = self._signal_and_wait(self._own_pids(), signal.SIGKILL, timeout=10)
            if leftover:
                raise RuntimeError(f"test cluster processes survived SIGKILL: {leftover}")
            if alive:
                warnings.warn(f"test cluster processes ignored SIGTERM for 15 s: {alive}")
        finally:
            if getattr(self, "_log", None):
                self._log.close()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _fake_worker_types(aws: Dict[str, Any]) -> Dict[str, Any]:
    """aws.yaml's serving GPU type, scaled down to 1 CPU + 1 logical GPU per node."""
    real = aws["available_node_types"][SERVE_NODE_TYPE]
    assert real["resources"]["GPU"] == 1
    return {
        SERVE_NODE_TYPE: {
            "resources": {"CPU": 1, "GPU": 1},
            "node_config": {},
            "min_workers": real["min_workers"],
            "max_workers": 2,
        }
    }


def _gpu_nodes() -> List[Dict[str, Any]]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def _wait_for(predicate, timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def autoscaling_cluster(aws: Dict[str, Any], monkeypatch) -> Iterator[LocalAutoscalingCluster]:
    # A throwaway head on this machine: no token (RAY_NOTES), on both sides.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # The shared local Ray (conftest) would compete with the cluster for the CPUs; the next
    # module that needs it starts it again.
    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 1, "GPU": 0},
        worker_node_types=_fake_worker_types(aws),
        idle_timeout_minutes=0.2,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


def _run_driver(
    cluster: LocalAutoscalingCluster, func: str, *args: str, log: Path, timeout: float
) -> None:
    """Run ``func(*args)`` of this module as a driver of ``cluster``, in a child Python process.

    A Ray driver whose GCS stays unreachable for gcs_rpc_server_reconnect_timeout_s (60 s) ends
    its process with _exit(1) (rpc_client.h), as it does when `ray start --block` tears the head
    down after one of its processes died: in the pytest process that ends the whole session with
    no summary. Here it fails this test, at once when the head exits, with both sides' output.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
        f"import test_cluster; test_cluster.{func}(*sys.argv[1:])"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    problem = None
    with open(log, "w+") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout
            while child.poll() is None:
                if cluster.head_exit_code() is not None:
                    problem = f"the head (`ray start --block`) exited with {cluster.head_exit_code()}"
                elif time.monotonic() > deadline:
                    problem = f"the driver did not finish in {timeout:.0f} s"
                if problem:
                    break
                time.sleep(1)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        out.seek(0)
        output = out.read()
    if problem is None and child.returncode != 0:
        problem = f"the driver exited with {child.returncode}"
    if problem:
        pytest.fail(
            f"{problem}\n----- driver output (tail) -----\n{output[-6000:]}"
            f"\n----- ray start --head (tail) -----\n{cluster.start_log()[-6000:]}",
            pytrace=False,
        )


def _drive_scale_up_and_down(address: str, storage_path: str) -> None:
    """The driver of the test below (see _run_driver): train on fake GPU nodes, wait for scale-down."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def report_node(config: Dict[str, Any]) -> List[str]:
        """Train function: gather every worker's node id over the gloo group, report them.

        Defined here so that it is pickled by value: tests/ is not importable on workers.
        """
        import torch.distributed as dist

        import ray.train

        node_id = ray.get_runtime_context().get_node_id()
        gathered: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, node_id)
        ray.train.report({"world_size": dist.get_world_size()})
        return gathered

    # RAY_ADDRESS for Ray Train's helper actors, which look the cluster up
    # themselves and fail when other Ray instances run on this machine.
    ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    nodes_before = {n["NodeID"] for n in ray.nodes()}
    assert nodes_before == {ray.get_runtime_context().get_node_id()}, "only the head at first"
    assert _gpu_nodes() == [], "the cluster must start without GPU nodes"
    assert ray.cluster_resources().get("GPU", 0) == 0

    trainer = TorchTrainer(
        report_node,
        # The fake GPU is a logical resource: workers reserve it, torch stays on CPU.
        scaling_config=ScalingConfig(
            num_workers=2, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1}
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="fake-gpu-scaleup", storage_path=storage_path),
    )
    result = trainer.fit()
    worker_nodes = result.return_value
    assert len(worker_nodes) == 2
    assert len(set(worker_nodes)) == 2, f"both workers on one node: {worker_nodes}"
    assert not set(worker_nodes) & nodes_before, "workers must run on newly launched nodes"

    launched = {n["NodeID"]: n for n in ray.nodes()}
    for node_id in worker_nodes:
        node = launched[node_id]
        assert node["Resources"].get("GPU") == 1, node["Resources"]
        assert node["Alive"]

    # Idle for idle_timeout_minutes (12 s) -> the autoscaler removes both.
    assert _wait_for(lambda: _gpu_nodes() == [], timeout=90), (
        f"GPU nodes still alive after 90 s: {[n['NodeID'] for n in _gpu_nodes()]}"
    )
    dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    assert set(worker_nodes) <= dead


@pytest.mark.slow
def test_gpu_nodes_scale_up_for_training_and_down_when_idle(
    autoscaling_cluster: LocalAutoscalingCluster, tmp_path: Path
) -> None:
    _run_driver(
        autoscaling_cluster,
        "_drive_scale_up_and_down",
        autoscaling_cluster.address,
        str(tmp_path / "train"),
        log=tmp_path / "driver.log",
        timeout=600,
    )
