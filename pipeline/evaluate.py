"""Batch evaluation: Ray Data inference with a model held by an actor pool, metrics, MLflow.

Flow: eval records (``pipeline.benchmarks``) -> ``ray.data.from_items`` of ``{_idx, image,
prompt, task}`` -> ``map_batches(Predictor, compute=ActorPoolStrategy(size=N))`` where each
actor loads the checkpoint once (``num_gpus=1`` per actor with ``use_gpu``) and generates
greedily for a whole batch with ``model.engine.Engine`` -> predictions joined back to the
records on the driver -> per-record metrics (``pipeline.metrics``) -> means overall and per
task -> MLflow: params, metrics, a predictions table + JSONL artifact, and a few pages drawn
with predicted and reference boxes.

Scoring rules: text metrics compare the prediction and the reference after the same
cleaning, ``model.grounding.to_markdown`` (grounding markup removed); ``plain_*`` metrics
compare words only (markdown/HTML syntax removed too), which is fair to systems that do not
write markdown. Box metrics (grounding tasks only) match ``parse_grounding`` of both sides
by label at IoU >= 0.5 (``box_*``) and regardless of label (``box_any_*``). ``line<i>_cer``
pairs the i-th lines of both (``pipeline.metrics.line_cers``): where down a page a reading drifts.

A peer baseline goes through the same path: :class:`TesseractPredictor` calls the
``tesseract`` binary (TSV output), rebuilds block-level text and 0..999 boxes, and writes its
answer in our grounding format for grounding tasks, so one scorer serves both systems.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from model.tasks import GROUNDING_TASKS
from pipeline import metrics as M

log = logging.getLogger(__name__)

SYSTEM_MODEL = "model"
SYSTEM_TESSERACT = "tesseract"
TESSERACT_INSTALL = "apt-get update && apt-get install -y tesseract-ocr"
# Metrics shown in the side-by-side table (all are logged).
TABLE_METRICS = ("edit_distance", "cer", "line1_cer", "line2_cer", "line3_cer", "line4plus_cer", "wer", "f1",
                 "plain_edit_distance", "plain_f1", "box_f1", "box_mean_iou", "box_gt_iou70", "box_any_f1",
                 "box_too_many", "pages_per_s")


@dataclass
class EvalConfig:
    """What to evaluate and where results go (the flags of ``jobs/evaluate.py``)."""

    data: str  # a JSONL eval manifest, a Fox page-OCR JSON or OmniDocBench.json
    checkpoint: str | None = None  # our model; None evaluates only the baseline
    baseline: str | None = None  # "tesseract"
    image_dir: str | None = None  # Fox / OmniDocBench image folder
    tasks: tuple[str, ...] | None = None
    limit: int | None = None
    max_new_tokens: int = 1024
    batch_size: int = 4
    num_actors: int = 1
    use_gpu: bool = False
    tesseract_lang: str = "eng"
    experiment: str = "nano-deepseek-ocr-eval"
    run_name: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    log_mlflow: bool = True
    out_dir: str = "artifacts/eval"
    n_render: int = 3


@dataclass
class EvalResult:
    system: str
    metrics: dict[str, float]
    rows: list[dict]
    run_id: str | None = None
    out_dir: str | None = None
    predictions_path: str | None = None


@dataclass
class EvalReport:
    results: dict[str, EvalResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # system -> why
    parent_run_id: str | None = None

    def table(self, metrics: Sequence[str] = TABLE_METRICS) -> str:
        return comparison_table({k: v.metrics for k, v in self.results.items()}, metrics)


# ------------------------------------------------------------------------------ predictors


class ModelPredictor:
    """Ray Data callable class: loads a checkpoint once per actor, generates for whole batches.

    The image processor runs in the checkpoint's training mode (``meta["processor"]["mode"]``).
    """

    def __init__(self, checkpoint: str, max_new_tokens: int = 1024, use_gpu: bool = False) -> None:
        import torch

        from model.engine import Engine, SamplingParams
        from model.processor import ImageProcessor
        from model.weights import load_checkpoint

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.device = device
        if use_gpu and device == "cpu":
            log.warning("use_gpu was requested but CUDA is not available in this actor; running on CPU")
        model, tokenizer, meta = load_checkpoint(checkpoint, device=device)
        if tokenizer is None:
            raise ValueError(f"checkpoint {checkpoint} has no tokenizer.json; evaluation needs one")
        self.mode = (meta.get("processor") or {}).get("mode", "gundam")
        self.processor = ImageProcessor.from_mode(self.mode)
        self.engine = Engine(model, tokenizer, device=device)
        whitelist = set()
        for name in ("<td>", "</td>"):  # the reference exempts table cells from n-gram blocking
            try:
                whitelist.add(tokenizer.token_id(name))
            except KeyError:
                pass
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                     whitelist_ids=frozenset(whitelist))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list]:
        from model.engine import GenerationRequest
        from model.processor import ImageError
        from model.vlm import ImageViews

        n = len(batch["_idx"])
        out = _empty_output(batch)
        requests, where = [], []
        start = time.perf_counter()  # pages/s counts image processing as well as generation
        for i in range(n):
            try:
                processed = self.processor.process(str(batch["image"][i]))
            except ImageError as e:
                out["error"][i] = f"image {e.reason}: {e}"
                continue
            requests.append(GenerationRequest(str(batch["prompt"][i]), [ImageViews.from_processed(processed)],
                                              params=self.params))
            where.append(i)
        for i, r in zip(where, self._generate(requests)):
            if isinstance(r, Exception):
                out["error"][i] = f"generation failed: {r}"
                continue
            out["prediction"][i] = r.text
            out["finish_reason"][i] = r.finish_reason
            out["n_tokens"][i] = len(r.token_ids)
        seconds = time.perf_counter() - start
        for i in range(n):
            out["seconds"][i] = seconds / n
            out["device"][i] = self.device
        return out


    def _generate(self, requests: list) -> list:
        """Results for a batch; if the batch is refused (e.g. a prompt longer than the cache), one by one."""
        if not requests:
            return []
        try:
            return self.engine.generate(requests)
        except ValueError:
            results: list = []
            for r in requests:
                try:
                    results += self.engine.generate([r])
                except ValueError as e:
                    results.append(e)
            return results


def predict_images(checkpoint: str | os.PathLike, images: Sequence[str], prompts: Sequence[str],
                   max_new_tokens: int = 1024, batch_size: int = 8, use_gpu: bool = False) -> list[dict]:
    """In-process generation (no Ray) for a handful of images: ``[{prediction, finish_reason, ...}]``."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    predictor = ModelPredictor(str(checkpoint), max_new_tokens=max_new_tokens, use_gpu=use_gpu)
    out: list[dict] = []
    for s in range(0, len(images), batch_size):
        idx = np.arange(s, min(s + batch_size, len(images)))
        batch = {"_idx": idx, "image": np.array([str(images[i]) for i in idx], dtype=object),
                 "prompt": np.array([prompts[i] for i in idx], dtype=object)}
        res = predictor(batch)
        out += [{k: res[k][j] for k in res if k != "_idx"} for j in range(len(idx))]
    return out


def _empty_output(batch: Mapping[str, np.ndarray]) -> dict[str, list]:
    n = len(batch["_idx"])
    return {"_idx": [int(v) for v in batch["_idx"]], "prediction": [""] * n, "finish_reason": ["error"] * n,
            "n_tokens": [0] * n, "seconds": [0.0] * n, "error": [""] * n, "device": ["cpu"] * n}


def tesseract_available(binary: str = "tesseract") -> bool:
    return shutil.which(binary) is not None


_PSM = {"line": 7, "word": 8, "block": 6}  # one text line / one word / one block of text; pages: automatic (3)


def parse_tesseract_tsv(tsv: str, width: int | None = None,
                        height: int | None = None) -> tuple[list[str], list[tuple[int, int, int, int]]]:
    """(block texts, block boxes in 0..999) from ``tesseract ... tsv`` output.

    Words (level 5) are joined by spaces within a line and lines by newlines within a block
    (level 2); the page row (level 1) gives the image size when not passed.
    """
    lines = tsv.splitlines()
    if not lines or not lines[0].startswith("level"):
        return [], []
    cols = lines[0].split("\t")
    ix = {c: i for i, c in enumerate(cols)}
    blocks: dict[int, dict] = {}
    for raw in lines[1:]:
        parts = raw.split("\t")
        if len(parts) < len(cols) - 1:
            continue
        parts += [""] * (len(cols) - len(parts))
        level = int(parts[ix["level"]])
        left, top = int(parts[ix["left"]]), int(parts[ix["top"]])
        w, h = int(parts[ix["width"]]), int(parts[ix["height"]])
        if level == 1:
            width, height = width or w, height or h
        block = int(parts[ix["block_num"]])
        if level == 2:
            blocks.setdefault(block, {"lines": {}})["px"] = (left, top, left + w, top + h)
        elif level == 5:
            word = parts[ix["text"]].strip()
            if word:
                key = (int(parts[ix["par_num"]]), int(parts[ix["line_num"]]))
                blocks.setdefault(block, {"lines": {}})["lines"].setdefault(key, []).append(word)
    texts, boxes = [], []
    for b in sorted(blocks):
        info = blocks[b]
        text = "\n".join(" ".join(ws) for _, ws in sorted(info["lines"].items()))
        if not text.strip() or "px" not in info or not width or not height:
            continue
        x1, y1, x2, y2 = info["px"]
        scale = lambda v, s: min(999, max(0, int(round(v / s * 999))))  # noqa: E731
        texts.append(text)
        boxes.append((scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)))
    return texts, boxes


def tesseract_answer(texts: Sequence[str], boxes: Sequence[Sequence[int]], task: str) -> str:
    """Tesseract's blocks written as our model would answer the task (grounding markup for grounding tasks)."""
    from model.grounding import format_grounding

    if task in GROUNDING_TASKS:
        return "\n\n".join(f"{format_grounding('text', [b])}\n{t}" for t, b in zip(texts, boxes))
    if task in ("line", "word"):
        return " ".join(" ".join(t.split()) for t in texts)
    return "\n\n".join(texts)


class TesseractPredictor:
    """Ray Data callable class running the ``tesseract`` binary per image (the peer baseline)."""

    def __init__(self, lang: str = "eng", binary: str = "tesseract", timeout_s: float = 120.0) -> None:
        if not tesseract_available(binary):
            raise FileNotFoundError(f"{binary!r} not found on PATH; install it with: {TESSERACT_INSTALL}")
        self.lang, self.binary, self.timeout = lang, binary, timeout_s

    def predict(self, image: str, task: str) -> str:
        psm = _PSM.get(task, 3)
        proc = subprocess.run([self.binary, image, "stdout", "--psm", str(psm), "-l", self.lang, "tsv"],
                              capture_output=True, text=True, timeout=self.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"tesseract failed on {image}: {proc.stderr.strip()[-300:]}")
        texts, boxes = parse_tesseract_tsv(proc.stdout)
        return tesseract_answer(texts, boxes, task)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list]:
        out = _empty_output(batch)
        for i in range(len(out["_idx"])):
            start = time.perf_counter()
            try:
                out["prediction"][i] = self.predict(str(batch["image"][i]), str(batch["task"][i]))
                out["finish_reason"][i] = "stop"
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                out["error"][i] = str(e)
            out["seconds"][i] = time.perf_counter() - start
        return out


# ------------------------------------------------------------------------------- inference


def run_predictions(records: Sequence[Mapping], predictor: type, predictor_kwargs: Mapping[str, Any], *,
                    num_actors: int = 1, use_gpu: bool = False, batch_size: int = 4) -> list[dict]:
    """Predictions for ``records`` (in their order) from a Ray Data actor pool of ``predictor``."""
    import ray

    if not records:
        return []
    items = [{"_idx": i, "image": str(r["image"]), "prompt": str(r["prompt"]), "task": str(r.get("task", ""))}
             for i, r in enumerate(records)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), num_actors * 4)))
    ds = ds.map_batches(
        predictor,
        fn_constructor_kwargs=dict(predictor_kwargs),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
    )
    rows = ds.take_all()
    by_idx = {int(r["_idx"]): r for r in rows}
    missing = [i for i in range(len(items)) if i not in by_idx]
    if missing:
        raise RuntimeError(f"inference returned no prediction for {len(missing)} records (first: {missing[:5]})")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in by_idx[i].items() if k != "_idx"}
            for i in range(len(items))]


# --------------------------------------------------------------------------------- scoring


def reference_boxes(record: Mapping) -> list:
    """Reference boxes: parsed from a grounding response, else the record's ``boxes``."""
    from model.grounding import parse_grounding

    parsed = parse_grounding(str(record.get("response", ""))).boxes
    return parsed if parsed else M.as_boxes(record.get("boxes") or [])


def score_record(record: Mapping, prediction: str) -> dict[str, float]:
    """All metrics of one prediction against its record (see the module docstring)."""
    from model.grounding import parse_grounding

    ref = str(record.get("response", ""))
    pred_md, ref_md = M.strip_grounding(prediction), M.strip_grounding(ref)
    scores = M.text_scores(pred_md, ref_md)
    scores.update(M.line_cers(pred_md, ref_md))
    scores.update(M.paragraph_counts(pred_md, ref_md))
    scores.update(M.text_scores(M.plain_text(prediction), M.plain_text(ref), prefix="plain_"))
    if record.get("task") in GROUNDING_TASKS:
        pred_boxes = parse_grounding(prediction).boxes
        gt_boxes = reference_boxes(record)
        scores.update(M.box_scores(pred_boxes, gt_boxes, prefix="box_"))
        anyb = M.box_scores(pred_boxes, gt_boxes, by_label=False, prefix="box_any_")
        scores.update({k: v for k, v in anyb.items() if k in ("box_any_f1", "box_any_mean_iou", "box_any_gt_iou70")})
    return scores


def score_predictions(records: Sequence[Mapping], predictions: Sequence[Mapping]) -> list[dict]:
    """One row per record: id, task, prediction, reference, timing and every metric."""
    rows = []
    for r, p in zip(records, predictions):
        row = {"id": str(r["id"]), "task": str(r.get("task", "")), "image": str(r["image"]),
               "prediction": p.get("prediction", ""), "reference": str(r.get("response", "")),
               "finish_reason": p.get("finish_reason", ""), "n_tokens": int(p.get("n_tokens", 0)),
               "seconds": float(p.get("seconds", 0.0)), "error": p.get("error", ""),
               "device": p.get("device", "")}
        row["metrics"] = score_record(r, row["prediction"])
        rows.append(row)
    return rows


def aggregate(rows: Sequence[Mapping]) -> dict[str, float]:
    """Means overall and per task (``<task>/<metric>``), counts, errors and throughput.

    ``pages_per_s`` is the rate of one inference worker (image processing + generation, model
    loading excluded), comparable between systems; ``evaluate_system`` adds the job's wall
    clock rate, ``wall_pages_per_s``, which includes actor start-up.
    """
    out = M.mean_scores(r["metrics"] for r in rows)
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        out.update({f"{task}/{k}": v for k, v in M.mean_scores(r["metrics"] for r in sub).items()
                    if not k.startswith(("box_n_", "box_matched"))})
        out[f"{task}/n"] = float(len(sub))
    n = len(rows)
    seconds = sum(float(r["seconds"]) for r in rows)
    out["n"] = float(n)
    out["errors"] = float(sum(bool(r["error"]) for r in rows))
    out["truncated_frac"] = sum(r["finish_reason"] == "length" for r in rows) / n if n else 0.0
    out["inference_s"] = seconds
    out["pages_per_s"] = n / seconds if seconds > 0 else 0.0
    return out


def comparison_table(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown table: one row per metric, one column per system (systems on the same pages)."""
    systems = list(results)
    shown = [m for m in metrics if any(m in results[s] for s in systems)]
    header = ["metric", *systems]
    body = [[m, *[_fmt(results[s].get(m)) for s in systems]] for m in shown]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


# ------------------------------------------------------------------------------- rendering


def render_page(row: Mapping, out_path: str | os.PathLike) -> Path | None:
    """Reference boxes (left) and predicted boxes (right) drawn on the page; None if unreadable."""
    from PIL import Image, ImageDraw

    from model.grounding import Box, draw_boxes, parse_grounding

    try:
        image = Image.open(row["image"]).convert("RGB")
    except (OSError, ValueError):
        return None
    ref = [Box(b.label, tuple(int(v) for v in b.box)) for b in reference_boxes({"response": row["reference"]})]
    left = draw_boxes(image, ref)
    right = draw_boxes(image, parse_grounding(str(row["prediction"])).boxes)
    w, h = image.size
    band = 24
    canvas = Image.new("RGB", (2 * w + 8, h + band), (255, 255, 255))
    canvas.paste(left, (0, band))
    canvas.paste(right, (w + 8, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"reference: {row['id']}", fill=(0, 0, 0))
    draw.text((w + 12, 4), "prediction", fill=(0, 0, 0))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


# ---------------------------------------------------------------------------------- driver


def load_records(cfg: EvalConfig) -> list[dict]:
    from pipeline.benchmarks import load_eval_records

    records = load_eval_records(cfg.data, image_dir=cfg.image_dir, tasks=cfg.tasks, limit=cfg.limit)
    if not records:
        raise ValueError(f"no eval records in {cfg.data} (tasks={cfg.tasks}, limit={cfg.limit})")
    return records


def _predictor_for(system: str, cfg: EvalConfig) -> tuple[type, dict[str, Any], bool]:
    if system == SYSTEM_MODEL:
        if not cfg.checkpoint:
            raise ValueError("evaluating the model needs a checkpoint directory")
        return ModelPredictor, {"checkpoint": str(Path(cfg.checkpoint).resolve()),
                                "max_new_tokens": cfg.max_new_tokens, "use_gpu": cfg.use_gpu}, cfg.use_gpu
    if system == SYSTEM_TESSERACT:
        return TesseractPredictor, {"lang": cfg.tesseract_lang}, False
    raise ValueError(f"unknown system {system!r}; choose {SYSTEM_MODEL!r} or {SYSTEM_TESSERACT!r}")


def evaluate_system(records: Sequence[Mapping], system: str, cfg: EvalConfig,
                    parent_run_id: str | None = None) -> EvalResult:
    """Predict, score, write ``predictions.jsonl`` + rendered pages, and log everything to MLflow."""
    predictor, kwargs, gpu = _predictor_for(system, cfg)
    wall = time.perf_counter()
    preds = run_predictions(records, predictor, kwargs, num_actors=cfg.num_actors, use_gpu=gpu,
                            batch_size=cfg.batch_size)
    wall = time.perf_counter() - wall
    rows = score_predictions(records, preds)
    agg = aggregate(rows)
    agg["wall_s"] = wall
    agg["wall_pages_per_s"] = len(rows) / wall if wall > 0 else 0.0
    out = Path(cfg.out_dir) / system
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    with pred_path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(agg, indent=2, sort_keys=True))
    rendered = []
    grounded = [r for r in rows if r["task"] in GROUNDING_TASKS] or list(rows)
    for r in grounded[:cfg.n_render]:
        p = render_page(r, out / "pages" / f"{_safe(r['id'])}.png")
        if p is not None:
            rendered.append(p)
    run_id = None
    if cfg.log_mlflow:
        run_id = _log_to_mlflow(system, cfg, records, rows, agg, pred_path, rendered, parent_run_id)
    return EvalResult(system, agg, rows, run_id, str(out), str(pred_path))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]


def _eval_params(cfg: EvalConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in ("tracking_uri", "log_mlflow")}


def _log_to_mlflow(system: str, cfg: EvalConfig, records: Sequence[Mapping], rows: Sequence[Mapping],
                   agg: Mapping[str, float], pred_path: Path, rendered: Sequence[Path],
                   parent_run_id: str | None) -> str:
    from pipeline import tracking

    uri = cfg.tracking_uri or tracking.tracking_uri()
    name = f"{cfg.run_name}-{system}" if cfg.run_name else f"eval-{system}"
    run_id = tracking.start_run(cfg.experiment, run_name=name, tags={"eval.system": system, "job": "evaluate"},
                                parent_run_id=parent_run_id or cfg.parent_run_id, tracking_uri=uri)
    try:
        params: dict[str, Any] = {"eval": _eval_params(cfg),
                                  "system": system, "n_records": len(records),
                                  "tasks": sorted({str(r.get("task")) for r in records})}
        if system == SYSTEM_MODEL and cfg.checkpoint:
            from model.weights import read_checkpoint_config

            meta = read_checkpoint_config(cfg.checkpoint)
            params["checkpoint"] = {"mode": (meta.get("processor") or {}).get("mode"),
                                    "preset": (meta.get("model") or {}).get("preset")}
        tracking.log_params_flat(run_id, params, tracking_uri=uri)
        tracking.log_metrics(run_id, agg, step=0, tracking_uri=uri)
        table = {"id": [r["id"] for r in rows], "task": [r["task"] for r in rows],
                 "prediction": [r["prediction"] for r in rows], "reference": [r["reference"] for r in rows],
                 "edit_distance": [r["metrics"]["edit_distance"] for r in rows],
                 "box_f1": [r["metrics"].get("box_f1", float("nan")) for r in rows],
                 "error": [r["error"] for r in rows]}
        tracking.log_table(run_id, table, "predictions_table.json", tracking_uri=uri)
        tracking.log_artifact(run_id, str(pred_path), "predictions", tracking_uri=uri)
        tracking.log_artifact(run_id, str(pred_path.parent / "metrics.json"), "predictions", tracking_uri=uri)
        for p in rendered:
            tracking.log_artifact(run_id, str(p), "pages", tracking_uri=uri)
    except Exception:
        tracking.end_run(run_id, status="FAILED", tracking_uri=uri)
        raise
    tracking.end_run(run_id, status="FINISHED", tracking_uri=uri)
    return run_id


def evaluate(cfg: EvalConfig, progress: Callable[[str], None] | None = None) -> EvalReport:
    """Evaluate the model and/or the baseline on the same records.

    With two systems and MLflow on, a parent run holds the side-by-side table and each
    system gets a child run. A missing Tesseract binary skips the baseline with a message
    (``EvalReport.skipped``) instead of failing the job.
    """
    say = progress or log.info
    records = load_records(cfg)
    systems = ([SYSTEM_MODEL] if cfg.checkpoint else []) + ([cfg.baseline] if cfg.baseline else [])
    if not systems:
        raise ValueError("nothing to evaluate: pass a checkpoint and/or a baseline")
    report = EvalReport()
    if SYSTEM_TESSERACT in systems and not tesseract_available():
        why = f"tesseract not found on PATH; skipping the baseline (install: {TESSERACT_INSTALL})"
        say(why)
        report.skipped[SYSTEM_TESSERACT] = why
        systems.remove(SYSTEM_TESSERACT)
    if not systems:
        return report
    if cfg.use_gpu and SYSTEM_MODEL in systems:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) < 1:
            say("use_gpu: the cluster has no GPU right now; the actors wait until one joins (autoscaler)")
    parent = cfg.parent_run_id
    uri = None
    if cfg.log_mlflow and len(systems) > 1:
        from pipeline import tracking

        uri = cfg.tracking_uri or tracking.tracking_uri()
        parent = tracking.start_run(cfg.experiment, run_name=cfg.run_name or "eval-comparison",
                                    tags={"job": "evaluate"}, parent_run_id=cfg.parent_run_id, tracking_uri=uri)
        report.parent_run_id = parent
        tracking.log_params_flat(parent, {"eval": _eval_params(cfg), "systems": systems, "n_records": len(records)},
                                 tracking_uri=uri)
    for system in systems:
        say(f"evaluating {system} on {len(records)} records")
        report.results[system] = evaluate_system(records, system, cfg, parent_run_id=parent)
    table = report.table()
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "comparison.md").write_text(table + "\n")
    if report.parent_run_id:
        from pipeline import tracking

        tracking.log_text(report.parent_run_id, table + "\n", "comparison.md", tracking_uri=uri)
        for system, res in report.results.items():
            tracking.log_metrics(report.parent_run_id, {f"{system}/{k}": v for k, v in res.metrics.items()
                                                        if "/" not in k}, tracking_uri=uri)
        tracking.end_run(report.parent_run_id, tracking_uri=uri)
    return report
