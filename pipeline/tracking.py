"""MLflow helpers: run creation, flat params, metrics, artifacts, the model registry, comparison.

Every function takes an explicit ``run_id`` (and an optional ``tracking_uri``) and talks to
MLflow through ``MlflowClient``, never the fluent "active run": Ray Train retries and Ray Data
actors run in other processes, so the driver creates a run once and passes its id around
(RAY_NOTES: ``setup_mlflow`` in a retried worker leaves orphaned RUNNING runs).

Stores: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<abs>/artifacts/mlflow.db`` (MLflow
3.17 refuses the ``file://`` store). For SQLite stores, experiments get their artifact root
beside the database (``artifacts/mlartifacts/<experiment>``) instead of MLflow's default
``./mlruns`` in whatever directory the process happens to run in.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

DEFAULT_EXPERIMENT = "nano-deepseek-ocr"
PARAM_VALUE_LIMIT = 500  # the classic MLflow limit (newer servers allow 6000; 500 works everywhere)
PARAM_KEY_LIMIT = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARENT_TAG = "mlflow.parentRunId"
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ connection


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded default ``sqlite:///<abs>/artifacts/mlflow.db`` (dir created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path("artifacts").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _uri(uri: str | None) -> str:
    return uri or tracking_uri()


def client(uri: str | None = None):
    """An ``MlflowClient`` for ``uri`` (default: :func:`tracking_uri`), one per URI and process."""
    uri = _uri(uri)
    _check_uri(uri)
    return _client(uri)


@functools.lru_cache(maxsize=16)
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _check_uri(uri: str) -> None:
    is_file_store = uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    if is_file_store and not allowed:
        raise ValueError(
            f"MLflow tracking URI {uri!r}: the file store is refused by MLflow 3.17; use "
            "'sqlite:///path/mlflow.db' or an http(s):// tracking server "
            "(or set MLFLOW_ALLOW_FILE_STORE=true where no SQLite store exists, e.g. mlflow-skinny)"
        )
    if is_file_store and "artifacts" in Path(_file_store_path(uri)).parts:
        raise ValueError(
            f"MLflow tracking URI {uri!r}: MLflow's file store does not find runs under a folder named "
            "'artifacts' (it takes them for a run's artifacts and reports 'Run ... not found' right after "
            "creating one); put the store elsewhere, e.g. file:///tmp/mlruns, or use sqlite:///artifacts/mlflow.db"
        )
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def _file_store_path(uri: str) -> str:
    """The directory of a file-store URI (``file:///abs``, ``file:rel`` or a bare path), absolute."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):] if uri.startswith("file:") else uri
    return str(Path(path).resolve())


def _artifact_root(uri: str) -> str | None:
    """Artifact root for new experiments: beside a SQLite database, else the server's default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(name: str | None = None, tracking_uri: str | None = None, create: bool = True) -> str:
    """The id of experiment ``name`` (default ``nano-deepseek-ocr``), created when missing."""
    uri = _uri(tracking_uri)
    c = client(uri)
    name = name or DEFAULT_EXPERIMENT
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        raise ValueError(f"MLflow experiment {name!r} does not exist at {uri}")
    root = _artifact_root(uri)
    location = f"{root}/{_safe_name(name)}" if root else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "experiment"


# ------------------------------------------------------------------------------------ runs


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The checked-out commit of the project (``unknown`` outside a git work tree or before the first commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(repo or REPO_ROOT), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", sha) else "unknown"


def start_run(experiment: str | None, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, nested: bool = False, tracking_uri: str | None = None) -> str:
    """Create a RUNNING run (on the driver) and return its id; workers log into it by id.

    ``parent_run_id`` nests the run under another (MLflow's ``mlflow.parentRunId`` tag).
    ``nested=True`` without a parent takes ``MLFLOW_PARENT_RUN_ID`` or the fluent active run.
    The git commit is recorded as ``mlflow.source.git.commit``.
    """
    if nested and not parent_run_id:
        parent_run_id = os.environ.get("MLFLOW_PARENT_RUN_ID")
        if not parent_run_id:
            import mlflow

            active = mlflow.active_run()
            parent_run_id = active.info.run_id if active else None
        if not parent_run_id:
            raise ValueError("start_run(nested=True): no parent_run_id, MLFLOW_PARENT_RUN_ID or active run")
    uri = _uri(tracking_uri)
    c = client(uri)
    all_tags = {str(k): _stringify(v, PARAM_VALUE_LIMIT * 10) for k, v in (tags or {}).items()}
    commit = git_commit()
    if commit != "unknown":
        all_tags.setdefault("mlflow.source.git.commit", commit)
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(experiment_id(experiment, uri), tags=all_tags, run_name=run_name)
    return run.info.run_id


def run_exists(run_id: str, tracking_uri: str | None = None) -> bool:
    """Whether ``run_id`` is in this tracking store (a resumed job may point at another store)."""
    from mlflow.exceptions import MlflowException

    try:
        client(tracking_uri).get_run(run_id)
        return True
    except MlflowException:
        return False


def end_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    client(tracking_uri).set_terminated(run_id, status=status)


def set_tags(run_id: str, tags: Mapping[str, Any], tracking_uri: str | None = None) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k), _stringify(v, PARAM_VALUE_LIMIT * 10)) for k, v in tags.items()]
    c = client(tracking_uri)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        c.log_batch(run_id, tags=items[i:i + PARAMS_PER_BATCH])


# ---------------------------------------------------------------------------------- params


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values are kept as leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def _stringify(v: Any, limit: int = PARAM_VALUE_LIMIT) -> str:
    s = v if isinstance(v, str) else str(list(v) if isinstance(v, tuple) else v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def log_params_flat(run_id: str, params: Mapping[str, Any], tracking_uri: str | None = None) -> dict[str, str]:
    """Log a nested dict as ``a.b.c`` params: values stringified and cut to 500 chars, 100 per batch.

    Returns what was logged. Logging a key again with a *different* value is an MLflow error
    (params are immutable); the same value is accepted.
    """
    from mlflow.entities import Param

    flat = {k[:PARAM_KEY_LIMIT]: _stringify(v) for k, v in flatten(params).items()}
    items = [Param(k, v) for k, v in sorted(flat.items())]
    c = client(tracking_uri)
    for i in range(0, len(items), PARAMS_PER_BATCH):
        c.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])
    return flat


# --------------------------------------------------------------------------------- metrics


def metric_key(name: str) -> str:
    """A valid MLflow metric key (letters, digits, ``_ - . / space``; others become ``_``)."""
    return _METRIC_KEY_BAD.sub("_", str(name))[:PARAM_KEY_LIMIT]


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int = 0, tracking_uri: str | None = None,
                timestamp_ms: int | None = None) -> dict[str, float]:
    """Log numeric metrics at ``step`` (non-numeric values and None are skipped). Returns what was logged."""
    from mlflow.entities import Metric

    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    clean: dict[str, float] = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) and not _is_number_like(v):
            continue
        clean[metric_key(k)] = float(v)
    items = [Metric(k, v, ts, int(step)) for k, v in clean.items()]
    if items:
        c = client(tracking_uri)
        for i in range(0, len(items), METRICS_PER_BATCH):
            c.log_batch(run_id, metrics=items[i:i + METRICS_PER_BATCH])
    return clean


def _is_number_like(v: Any) -> bool:
    """numpy / torch scalars."""
    try:
        return hasattr(v, "item") and isinstance(v.item(), (int, float)) and not isinstance(v.item(), bool)
    except Exception:
        return False


# ------------------------------------------------------------------------------- artifacts


def log_artifact(run_id: str, path: str | os.PathLike, artifact_path: str | None = None,
                 tracking_uri: str | None = None) -> None:
    """Upload a file, or a directory's contents, under ``artifact_path`` of the run."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"log_artifact: {p} does not exist")
    c = client(tracking_uri)
    if p.is_dir():
        c.log_artifacts(run_id, str(p), artifact_path)
    else:
        c.log_artifact(run_id, str(p), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str, tracking_uri: str | None = None) -> None:
    client(tracking_uri).log_text(run_id, text, artifact_file)


def log_dict(run_id: str, data: Any, artifact_file: str, tracking_uri: str | None = None) -> None:
    client(tracking_uri).log_dict(run_id, data, artifact_file)


def log_table(run_id: str, data: Any, artifact_file: str, tracking_uri: str | None = None) -> None:
    """A table (dict of columns or a pandas DataFrame) as a JSON artifact MLflow's UI can show."""
    client(tracking_uri).log_table(run_id, data, artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str, tracking_uri: str | None = None) -> None:
    """A matplotlib figure as an image artifact (e.g. ``plots/curves.png``)."""
    client(tracking_uri).log_figure(run_id, figure, artifact_file)


def log_image(run_id: str, image: Any, artifact_file: str, tracking_uri: str | None = None) -> None:
    """A PIL image or HWC uint8 array as an image artifact (e.g. ``pages/0.png``)."""
    client(tracking_uri).log_image(run_id, image, artifact_file=artifact_file)


def download_artifacts(run_id: str, path: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    return Path(client(tracking_uri).download_artifacts(run_id, path, str(dst)))


# -------------------------------------------------------------------------------- registry


def register_model(run_id: str, artifact_path: str, name: str, tracking_uri: str | None = None,
                   tags: Mapping[str, Any] | None = None) -> str:
    """Register ``<run artifacts>/<artifact_path>`` as a new version of model ``name``; returns the version."""
    c = client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    source = c.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path.strip("/")
    mv = c.create_model_version(name, source=source, run_id=run_id,
                                tags={str(k): str(v) for k, v in (tags or {}).items()} or None)
    return str(mv.version)


# ------------------------------------------------------------------------------ comparison


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # the final (latest) value of each metric
    tags: dict[str, str]
    start_time: int


@dataclass
class Comparison:
    """Runs side by side: the params that differ and the final metrics."""

    runs: list[RunSummary]
    differing_params: dict[str, dict[str, str | None]] = field(default_factory=dict)  # param -> run_id -> value
    metric_names: list[str] = field(default_factory=list)

    def label(self, run: RunSummary) -> str:
        names = [r.name for r in self.runs]
        return run.name if run.name and names.count(run.name) == 1 else f"{run.name or 'run'}:{run.run_id[:8]}"

    def table(self, fmt: str = "markdown", metrics: Sequence[str] | None = None) -> str:
        """One column per run; rows = differing params, then final metrics."""
        metrics = list(metrics) if metrics is not None else self.metric_names
        header = ["", *[self.label(r) for r in self.runs]]
        rows = [["run_id", *[r.run_id[:12] for r in self.runs]]]
        for p in sorted(self.differing_params):
            rows.append([f"param: {p}", *[_cell(self.differing_params[p].get(r.run_id)) for r in self.runs]])
        for m in metrics:
            rows.append([f"metric: {m}", *[_fmt_num(r.metrics.get(m)) for r in self.runs]])
        return _render(header, rows, fmt)

    def to_dict(self) -> dict:
        return {
            "runs": [{"run_id": r.run_id, "name": r.name, "status": r.status, "metrics": r.metrics} for r in self.runs],
            "differing_params": self.differing_params,
        }


def _cell(v: str | None) -> str:
    return "—" if v is None else (v if len(v) <= 40 else v[:37] + "...")


def _fmt_num(v: float | None) -> str:
    if v is None:
        return "—"
    if v != v or math.isinf(v):
        return str(v)
    return f"{v:.4g}"


def _render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; choose 'markdown' or 'csv'")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


def find_runs(run_ids: Sequence[str] | None = None, experiment: str | Sequence[str] | None = None,
              tag: str | Mapping[str, str] | None = None, tracking_uri: str | None = None,
              max_runs: int = 50) -> list:
    """MLflow runs by explicit ids, or by experiment name(s) filtered by ``tag`` ("k=v" or a dict)."""
    c = client(tracking_uri)
    if run_ids:
        return [c.get_run(r) for r in run_ids]
    if experiment is None:
        raise ValueError("find_runs: give run ids or an experiment name")
    names = [experiment] if isinstance(experiment, str) else list(experiment)
    ids = []
    for n in names:
        exp = c.get_experiment_by_name(n)
        if exp is None:
            raise ValueError(f"MLflow experiment {n!r} not found at {_uri(tracking_uri)}")
        ids.append(exp.experiment_id)
    filters = []
    tags = _parse_tags(tag)
    for k, v in tags.items():
        key = f"tags.`{k}`" if not re.fullmatch(r"[A-Za-z0-9_]+", k) else f"tags.{k}"
        filters.append(f"{key} = '{v}'")
    return list(c.search_runs(ids, filter_string=" and ".join(filters), max_results=max_runs,
                              order_by=["attributes.start_time ASC"]))


def _parse_tags(tag: str | Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    if not tag:
        return {}
    if isinstance(tag, Mapping):
        return {str(k): str(v) for k, v in tag.items()}
    items = [tag] if isinstance(tag, str) else list(tag)
    out = {}
    for t in items:
        if "=" not in t:
            raise ValueError(f"tag filter {t!r} must look like key=value")
        k, v = t.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def compare_runs(run_ids: Sequence[str] | None = None, experiment: str | Sequence[str] | None = None,
                 tag: str | Mapping[str, str] | None = None, tracking_uri: str | None = None,
                 metrics: Sequence[str] | None = None, include_system: bool = False) -> Comparison:
    """The params that differ between runs and their final metrics (see :class:`Comparison`).

    ``metrics`` limits the metric rows (default: every metric any run logged, sorted).
    ``system/*`` metrics are left out unless ``include_system``.
    """
    runs = find_runs(run_ids, experiment, tag, tracking_uri)
    if not runs:
        raise ValueError("compare_runs: no runs matched")
    summaries = [
        RunSummary(
            run_id=r.info.run_id,
            name=r.info.run_name or r.data.tags.get("mlflow.runName", ""),
            status=r.info.status,
            params=dict(r.data.params),
            metrics={k: float(v) for k, v in r.data.metrics.items()},
            tags=dict(r.data.tags),
            start_time=int(r.info.start_time or 0),
        )
        for r in runs
    ]
    keys = sorted({k for s in summaries for k in s.params})
    differing = {}
    for k in keys:
        values = {s.run_id: s.params.get(k) for s in summaries}
        if len(set(values.values())) > 1:
            differing[k] = values
    names = sorted({k for s in summaries for k in s.metrics})
    if metrics is not None:
        names = [m for m in metrics]
    elif not include_system:
        names = [m for m in names if not m.startswith("system/")]
    return Comparison(summaries, differing, names)


def metric_histories(comparison: Comparison, metrics: Sequence[str] | None = None,
                     tracking_uri: str | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> run_id -> [(step, value)] sorted by step."""
    c = client(tracking_uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for m in metrics if metrics is not None else comparison.metric_names:
        for r in comparison.runs:
            hist = c.get_metric_history(r.run_id, m)
            if hist:
                pts = sorted((int(h.step), float(h.value)) for h in hist)
                out.setdefault(m, {})[r.run_id] = pts
    return out


def spans_decades(values: Sequence[float], decades: float = 3.0) -> bool:
    """Whether positive ``values`` span more than ``decades`` powers of ten (a panel then reads
    better on a log axis); never for values with a zero or a negative."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return math.log10(max(finite) / min(finite)) > decades


def plot_curves(comparison: Comparison, path: str | os.PathLike, metrics: Sequence[str] | None = None,
                tracking_uri: str | None = None, max_panels: int = 12) -> Path:
    """A PNG grid of metric curves (one panel per metric, one line per run); single points as markers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    hist = metric_histories(comparison, metrics, tracking_uri)
    names = [m for m in (metrics if metrics is not None else comparison.metric_names) if m in hist][:max_panels]
    if not names:
        raise ValueError("plot_curves: none of the runs has a history for the requested metrics")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    try:
        for ax, m in zip(axes.flat, names):
            for r in comparison.runs:
                pts = hist[m].get(r.run_id)
                if not pts:
                    continue
                steps, values = zip(*pts)
                ax.plot(steps, values, marker="o" if len(pts) < 3 else None, label=comparison.label(r))
            if spans_decades([v for pts in hist[m].values() for _, v in pts]):
                ax.set_yscale("log")  # a grad norm's spikes of 1e9 would flatten its usual 5-50 to zero
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        seen: dict[str, Any] = {}
        for ax in axes.flat:  # every run once, even if the first panel lacks some
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        labels, handles = list(seen), list(seen.values())
        if handles:
            fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.92 if handles else 1))
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
