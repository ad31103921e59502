"""The whole pipeline in one command (what ``make demo`` runs on the embedded defaults).

synthetic pages -> tokenizer -> Ray Data shards -> stage 1 -> stage 2 -> evaluation ->
MLflow comparison of the stages -> Ray Serve -> real HTTP OCR requests (one training page,
one held-out page) whose markdown and boxes land in ``artifacts/demo/``.

Each stage is skipped when its output exists (re-running resumes; an evaluation stopped part-way
keeps the splits it finished on the same checkpoint); ``--force`` redoes all.

    python jobs/speedrun.py                                      # tiny, CPU, local Ray
    python jobs/speedrun.py --preset small --use-gpu             # one GPU
    python jobs/speedrun.py --preset full --address auto         # a cluster
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import REPO_ROOT, init_ray, parse_settings

CONFIGS = REPO_ROOT / "jobs" / "configs"
HELDOUT_LINES = "heldout_lines"  # data/ folder of the held-out pages' line crops (eval_line_crops)
HELDOUT_LINES_ON_PAGE = "heldout_lines_on_page"  # the same crops at page scale (stream_crop_scale: page)


@dataclass
class SpeedrunConfig:
    """Knobs of the end-to-end run (``jobs/configs/speedrun_<preset>.yaml``)."""

    preset: str = "tiny"
    mode: str = "tiny"
    out: str = "artifacts"
    synth_profile: str = "easy"
    # SynthConfig fields over the profile's, for both the pages on disk and the stream
    synth_overrides: dict[str, Any] = field(default_factory=dict)
    train_pages: int = 8
    heldout_pages: int = 4
    text_records: int = 16
    tasks: list[str] = field(default_factory=lambda: ["markdown"])
    seed: int = 0
    vocab_size: int = 1024
    max_seq_len: int = 1024
    stage1_config: str = "jobs/configs/stage1_tiny.yaml"
    stage2_config: str = "jobs/configs/stage2_tiny.yaml"
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    stage1_time_limit_s: float | None = None  # stop stage 1 with a checkpoint; a re-run of the speedrun resumes it
    # stop stage 1 with a checkpoint at this wall-clock time (time.time()): --stage1-stop-within sets it
    # from the speedrun's start, so the steps before the stage (data, Ray, compiling) count too
    stage1_stop_at_unix_s: float | None = None
    # end stage 1 as finished at this wall-clock time (--stage1-end-within): the evaluation still runs
    stage1_end_at_unix_s: float | None = None
    stage1_overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over stage1_config's
    num_workers: int = 1
    use_gpu: bool = False
    eval_max_new_tokens: int = 512
    eval_limit: int | None = None  # records per split (None: all)
    eval_batch_size: int = 4  # requests one evaluation actor generates together
    eval_baseline: str | None = None  # "tesseract": the peer baseline on the same pages
    eval_line_crops: int = 0  # > 0: also read this many line crops of the held-out pages (reading shows there first)
    # also read those crops at the page's text size (always so unless stream_crop_scale: crop)
    eval_lines_on_page: bool = False
    stream_pages: int = 0  # > 0: stage 1 trains on this many pages rendered on the fly (Ray Data)
    stream_tasks: dict[str, float] = field(default_factory=lambda: {"markdown": 0.5, "free": 0.5})
    stream_crops_per_page: int = 1  # crop-task pages give up to this many crops (bench/stream.py: fewer CPUs needed)
    # line/word/block crops of the stream: "crop", "page" (at the page's text size) or "zoom" (a size drawn
    # between the two): SynthStreamConfig.crop_scale
    stream_crop_scale: str = "crop"
    stream_render_tasks: int | None = None  # at most this many render tasks at once: SynthStreamConfig.render_tasks
    stages: list[int] = field(default_factory=lambda: [1, 2])  # [1]: stop after stage 1
    serve_port: int = 8000
    demo_task: str = "markdown"
    experiment: str = "nano-deepseek-ocr"

    def __post_init__(self) -> None:
        if self.stages not in ([1], [1, 2]):
            raise ValueError(f"stages must be [1] or [1, 2], got {self.stages}")
        self.synth_config().validate()  # an unknown profile or override fails before any work

    def synth_config(self, **settings: Any):
        """The profile with ``synth_overrides`` and ``settings`` over it."""
        from pipeline.synth import SynthConfig

        return SynthConfig.from_yaml_overrides(self.synth_profile, self.synth_overrides, "synth_overrides", **settings)

    def page_seed(self, split: str) -> int:
        """The seed the split's pages on disk are drawn with (held-out pages: other layouts)."""
        return self.seed + (1 if split == "heldout" else 0)

    @property
    def root(self) -> Path:
        return Path(self.out)

    @property
    def final_stage(self) -> int:
        return self.stages[-1]


def load_config(path: str | None, **overrides: Any) -> SpeedrunConfig:
    from model.config import from_yaml

    return from_yaml(SpeedrunConfig, path, "speedrun", **overrides)


class Steps:
    """Runs named steps in order, skipping those whose output exists, and times them."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.timings: list[tuple[str, float, bool]] = []

    def run(self, name: str, done: Callable[[], bool], fn: Callable[[], Any]) -> Any:
        if not self.force and done():
            print(f"==> {name}: output exists, skipped (--force to redo)", flush=True)
            self.timings.append((name, 0.0, True))
            return None
        print(f"==> {name}", flush=True)
        start = time.perf_counter()
        value = fn()
        self.timings.append((name, time.perf_counter() - start, False))
        return value


class State:
    """What earlier runs produced (MLflow run ids): lets a resumed speedrun compare stages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def make_data(cfg: SpeedrunConfig) -> None:
    from pipeline.synth import generate, text_records

    synth = cfg.synth_config(tasks=tuple(cfg.tasks))
    data = cfg.root / "data"
    generate(data / "train", cfg.train_pages, synth, seed=cfg.page_seed("train"), split="train")
    generate(data / "heldout", cfg.heldout_pages, synth, seed=cfg.page_seed("heldout"), split="heldout")
    for split, crop_scale in line_crop_splits(cfg).items():  # the same held-out pages, cut into their lines
        lines = cfg.synth_config(tasks=("line",), crop_scale=crop_scale)
        generate(data / split, cfg.heldout_pages, lines, seed=cfg.page_seed("heldout"), split="heldout")
    with open(data / "text.jsonl", "w") as f:
        for record in text_records(cfg.text_records, seed=cfg.seed):
            f.write(json.dumps(record) + "\n")


def train_tokenizer(cfg: SpeedrunConfig) -> None:
    """A BPE tokenizer on the data's own text (prompts, responses, conversations)."""
    from model.tokenizer import Tokenizer
    from pipeline.preprocess import record_texts

    texts = []
    for manifest in (cfg.root / "data" / "train" / "manifest.jsonl", cfg.root / "data" / "text.jsonl"):
        for line in manifest.read_text().splitlines():
            if line.strip():
                texts.extend(record_texts(line))
    Tokenizer.train(texts, cfg.vocab_size).save(cfg.root / "tokenizer")


def preprocess(cfg: SpeedrunConfig) -> dict:
    from pipeline.preprocess import PreprocessConfig, format_summary, run_preprocess

    result = run_preprocess(PreprocessConfig(
        manifests=[str(cfg.root / "data" / "train" / "manifest.jsonl"), str(cfg.root / "data" / "text.jsonl")],
        out=str(cfg.root / "shards"), mode=cfg.mode, preset=cfg.preset,
        tokenizer=str(cfg.root / "tokenizer" / "tokenizer.json"), max_seq_len=cfg.max_seq_len, rows_per_file=64))
    print(format_summary(result.stats), flush=True)
    return result.stats


def train(cfg: SpeedrunConfig, stage: int, parent_run_id: str | None, uri: str):
    from pipeline.train import run_stage

    return run_stage(stage_config(cfg, stage, parent_run_id, uri))


def stage_config(cfg: SpeedrunConfig, stage: int, parent_run_id: str | None = None, uri: str | None = None):
    """The stage's TrainConfig: its YAML under the speedrun's paths, sizes and stream."""
    from pipeline.train import load_train_config

    config_path = cfg.stage1_config if stage == 1 else cfg.stage2_config
    overrides: dict[str, Any] = dict(
        data=[str(cfg.root / "shards")], out=str(cfg.root / "runs"), preset=cfg.preset,
        tokenizer=str(cfg.root / "tokenizer" / "tokenizer.json"), parent_run_id=parent_run_id,
        tracking_uri=uri, experiment=cfg.experiment, num_workers=cfg.num_workers,
        use_gpu=cfg.use_gpu, steps=cfg.stage1_steps if stage == 1 else cfg.stage2_steps)
    if stage == 2:
        overrides["init_from"] = str(stage_dir(cfg, 1))
    else:
        overrides["time_limit_s"] = cfg.stage1_time_limit_s
        overrides["stop_at_unix_s"] = cfg.stage1_stop_at_unix_s
        overrides["end_at_unix_s"] = cfg.stage1_end_at_unix_s
        overrides.update(cfg.stage1_overrides)
    if stage == 1 and cfg.stream_pages:
        overrides["synth"] = stream_settings(cfg)
    train_cfg = load_train_config(str(REPO_ROOT / config_path), stage=stage, **overrides)
    train_cfg.export_dir = str(stage_dir(cfg, stage))
    return train_cfg


def stream_settings(cfg: SpeedrunConfig) -> dict:
    """Stage 1's ``synth:`` mapping (a pipeline.synth_stream.SynthStreamConfig) when it trains on the stream."""
    return {"profile": cfg.synth_profile, "pages": cfg.stream_pages, "seed": cfg.seed + 100, "mode": cfg.mode,
            "tasks": dict(cfg.stream_tasks), "crops_per_page": cfg.stream_crops_per_page,
            "crop_scale": cfg.stream_crop_scale, "render_tasks": cfg.stream_render_tasks,
            "overrides": dict(cfg.synth_overrides)}


def stage_dir(cfg: SpeedrunConfig, stage: int) -> Path:
    return cfg.root / "runs" / f"stage{stage}-{cfg.preset}" / "final"


def line_crop_splits(cfg: SpeedrunConfig) -> dict[str, str]:
    """The held-out line-crop splits (``data/`` folders) and how each shows its crops: always alone
    (comparable with earlier runs), and also at page scale when training shows crops smaller than
    alone or when asked (``eval_lines_on_page``: whether a page's lines read worse for their size or their context)."""
    if not cfg.eval_line_crops:
        return {}
    splits = {HELDOUT_LINES: "crop"}
    if cfg.stream_crop_scale != "crop" or cfg.eval_lines_on_page:
        splits[HELDOUT_LINES_ON_PAGE] = "page"
    return splits


def eval_splits(cfg: SpeedrunConfig) -> dict[str, int | None]:
    """The evaluated splits (folders under ``data/``) and how many records of each are read."""
    splits: dict[str, int | None] = {"train": cfg.eval_limit, "heldout": cfg.eval_limit}
    for split in line_crop_splits(cfg):
        splits[split] = cfg.eval_line_crops
    return splits


SPLIT_RECORD = "speedrun_split.json"  # eval/<split>/: one split's results and what they were measured on


def split_key(cfg: SpeedrunConfig, split: str, limit: int | None) -> dict:
    """What one split's evaluation depends on: the final checkpoint's weights file (path, size and
    modification time, so a retrained stage never reuses an old reading) and the reading settings."""
    weights = stage_dir(cfg, cfg.final_stage) / "model.safetensors"
    stat = weights.stat()
    return {"weights": str(weights.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "limit": limit,
            "max_new_tokens": cfg.eval_max_new_tokens, "baseline": cfg.eval_baseline if split != "train" else None}


def evaluate(cfg: SpeedrunConfig, parent_run_id: str | None, uri: str, force: bool = False) -> dict:
    """Evaluate each split, reusing a split finished earlier on the same checkpoint and settings:
    an evaluation stopped part-way (a device call's time limit) goes on from the next split."""
    from pipeline.evaluate import EvalConfig, evaluate as run_eval

    results = {}
    for split, limit in eval_splits(cfg).items():
        record_path = cfg.root / "eval" / split / SPLIT_RECORD
        key = split_key(cfg, split, limit)
        record = json.loads(record_path.read_text()) if record_path.is_file() and not force else None
        if record and record["key"] == key:
            results.update(record["results"])
            print(f"{split}: evaluated earlier on this checkpoint ({record_path.parent}), reused:\n{record['table']}",
                  flush=True)
            continue
        report = run_eval(EvalConfig(  # read with the settings the key records
            data=str(cfg.root / "data" / split / "manifest.jsonl"), checkpoint=str(stage_dir(cfg, cfg.final_stage)),
            max_new_tokens=key["max_new_tokens"], use_gpu=cfg.use_gpu, experiment=cfg.experiment,
            run_name=f"eval-{split}", parent_run_id=parent_run_id, tracking_uri=uri, limit=key["limit"],
            batch_size=cfg.eval_batch_size, baseline=key["baseline"], out_dir=str(cfg.root / "eval" / split)))
        split_results = {split: report.results["model"].metrics}
        for system, result in report.results.items():
            if system != "model":
                split_results[f"{split}-{system}"] = result.metrics
        results.update(split_results)
        table = report.table()
        record_path.write_text(json.dumps({"key": key, "results": split_results, "table": table}, indent=2))
        print(f"{split}:\n{table}", flush=True)
    (cfg.root / "eval" / "summary.json").write_text(json.dumps(results, indent=2))
    return results


def compare(cfg: SpeedrunConfig, run_ids: list[str], uri: str) -> str:
    from pipeline import tracking

    comparison = tracking.compare_runs(run_ids=run_ids, tracking_uri=uri)
    out = cfg.root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    table = comparison.table()
    (out / "stages.md").write_text(table + "\n")
    tracking.plot_curves(comparison, out / "stages.png", metrics=["loss", "lr", "grad_norm"], tracking_uri=uri)
    print(table, flush=True)
    return table


def serve_and_ask(cfg: SpeedrunConfig) -> list[dict]:
    """Deploy the OCR service on the stage-2 checkpoint and OCR two pages over real HTTP."""
    import httpx
    from ray import serve

    from model.grounding import draw_boxes, parse_grounding
    from model.processor import load_image
    from pipeline.metrics import cer
    from pipeline.synth import read_manifest
    from serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve_port})
    app = build_app({"checkpoint": str(stage_dir(cfg, cfg.final_stage)), "device": "cuda" if cfg.use_gpu else "cpu"})
    serve.run(app, name="ocr", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{cfg.serve_port}"
    demo = cfg.root / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    answers = []
    for split in ("train", "heldout"):
        record = next(r for r in read_manifest(cfg.root / "data" / split / "manifest.jsonl")
                      if r["task"] == cfg.demo_task)
        image_bytes = Path(record["image"]).read_bytes()
        response = httpx.post(f"{url}/v1/ocr", timeout=600, json={
            "image_base64": base64.b64encode(image_bytes).decode(), "task": cfg.demo_task,
            "max_tokens": cfg.eval_max_new_tokens})
        response.raise_for_status()
        body = response.json()
        page = load_image(record["image"])
        boxes = parse_grounding(body["text"]).boxes
        (demo / f"{split}.mmd").write_text(body["markdown"])
        (demo / f"{split}.raw.txt").write_text(body["text"])
        draw_boxes(page, boxes).save(demo / f"{split}_boxes.png")
        shutil.copy(record["image"], demo / f"{split}_page.png")
        score = cer(body["text"], record["response"])
        answers.append({"split": split, "id": record["id"], "cer": score, "exact": body["text"] == record["response"],
                        "markdown": str(demo / f"{split}.mmd"), "boxes_image": str(demo / f"{split}_boxes.png"),
                        "n_boxes": len(body.get("boxes", []))})
    return answers


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    from pipeline.synth import CROP_SCALES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="speedrun YAML (default: jobs/configs/speedrun_<preset>.yaml)")
    parser.add_argument("--preset", choices=["tiny", "small", "full"],
                        help="model preset (default: the config's, else tiny)")
    parser.add_argument("--out", help="artifacts directory (default ./artifacts)")
    parser.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None)
    parser.add_argument("--num-workers", dest="num_workers", type=int)
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--stage1-steps", dest="stage1_steps", type=int)
    parser.add_argument("--stage2-steps", dest="stage2_steps", type=int)
    parser.add_argument("--stage1-time-limit", dest="stage1_time_limit_s", type=float,
                        help="seconds: stage 1 checkpoints and the speedrun stops; run it again to resume")
    parser.add_argument("--stage1-stop-within", dest="stage1_stop_within_s", type=float,
                        help="seconds since this command started: stage 1 checkpoints and the speedrun stops by "
                             "then (a machine lent for a limited call: its limit less a margin for saving)")
    parser.add_argument("--stage1-end-within", dest="stage1_end_within_s", type=float,
                        help="seconds since this command started: stage 1 ends there as finished (its final "
                             "checkpoint at the step reached) and the evaluation follows (a lease that must end "
                             "with a measured model)")
    parser.add_argument("--stage1-set", dest="stage1_settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-1 TrainConfig field, VALUE read as YAML (repeatable): "
                             "--stage1-set profile_at=100")
    parser.add_argument("--stream-crop-scale", dest="stream_crop_scale", choices=CROP_SCALES,
                        help="stage 1 on the stream: line/word/block crops resized to the view (crop), at the page's "
                             "text size (page) or at a size drawn between the two (zoom)")
    parser.add_argument("--stream-render-tasks", dest="stream_render_tasks", type=int, metavar="N",
                        help="stage 1 on the stream: at most N render tasks at once (default: one per free CPU); "
                             "fewer leave CPUs to the trainer")
    parser.add_argument("--train-pages", dest="train_pages", type=int)
    parser.add_argument("--heldout-pages", dest="heldout_pages", type=int)
    parser.add_argument("--eval-limit", dest="eval_limit", type=int,
                        help="evaluate at most this many records per split")
    parser.add_argument("--serve-port", dest="serve_port", type=int)
    parser.add_argument("--no-serve", action="store_true", help="stop after the comparison")
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)
    config = args.config or str(CONFIGS / f"speedrun_{args.preset or 'tiny'}.yaml")
    cfg = load_config(config, preset=args.preset, out=args.out, use_gpu=args.use_gpu, num_workers=args.num_workers,
                      stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                      stage1_time_limit_s=args.stage1_time_limit_s,
                      stage1_stop_at_unix_s=(None if args.stage1_stop_within_s is None
                                             else started + args.stage1_stop_within_s),
                      stage1_end_at_unix_s=(None if args.stage1_end_within_s is None
                                            else started + args.stage1_end_within_s),
                      train_pages=args.train_pages, heldout_pages=args.heldout_pages, eval_limit=args.eval_limit,
                      serve_port=args.serve_port, stream_crop_scale=args.stream_crop_scale,
                      stream_render_tasks=args.stream_render_tasks)
    cfg.stage1_overrides.update(parse_settings(args.stage1_settings))
    cfg.out = str(Path(cfg.out).resolve())  # Ray workers and actors do not share our working directory
    cfg.root.mkdir(parents=True, exist_ok=True)
    if args.force:
        for sub in ("data", "tokenizer", "shards", "runs", "eval", "compare", "demo", "speedrun_state.json"):
            target = cfg.root / sub
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)

    from pipeline import tracking

    uri = tracking.tracking_uri()
    state = State(cfg.root / "speedrun_state.json")
    steps = Steps(args.force)
    start = time.perf_counter()
    init_ray(args.address)
    if state["pipeline_run_id"] and not tracking.run_exists(state["pipeline_run_id"], tracking_uri=uri):
        print(f"the pipeline's MLflow run {state['pipeline_run_id']} is not in {uri}: starting a new one", flush=True)
        state["pipeline_run_id"] = None
    if not state["pipeline_run_id"]:
        state["pipeline_run_id"] = tracking.start_run(cfg.experiment, run_name=f"speedrun-{cfg.preset}",
                                                      tags={"job": "speedrun", "preset": cfg.preset}, tracking_uri=uri)
        tracking.log_params_flat(state["pipeline_run_id"], {"speedrun": dataclasses.asdict(cfg)}, tracking_uri=uri)
    else:  # a resumed speedrun: its run is running again until it stops
        tracking.client(uri).update_run(state["pipeline_run_id"], status="RUNNING")
    parent = state["pipeline_run_id"]
    try:
        complete = run_pipeline(cfg, args, state, steps, parent, uri, start)
    except KeyboardInterrupt:
        tracking.end_run(parent, status="KILLED", tracking_uri=uri)
        raise
    except BaseException:
        tracking.end_run(parent, status="FAILED", tracking_uri=uri)
        raise
    # like a stage's own run: KILLED while a stopped stage waits to be resumed, FINISHED when all is done
    tracking.end_run(parent, status="FINISHED" if complete else "KILLED", tracking_uri=uri)
    return 0


def run_pipeline(cfg: SpeedrunConfig, args: argparse.Namespace, state: State, steps: Steps, parent: str, uri: str,
                 start: float) -> bool:
    """Every step of the speedrun under its MLflow run ``parent``; False when a stage stopped to be resumed."""
    from pipeline import tracking

    steps.run("synthetic data", lambda: all((cfg.root / "data" / split / "manifest.jsonl").is_file()
                                            for split in eval_splits(cfg)), lambda: make_data(cfg))
    steps.run("tokenizer", lambda: (cfg.root / "tokenizer" / "tokenizer.json").is_file(), lambda: train_tokenizer(cfg))
    if 2 in cfg.stages or not cfg.stream_pages:  # a stage-1 stream needs no shards
        steps.run("preprocess (Ray Data)", lambda: (cfg.root / "shards" / "stats.json").is_file(),
                  lambda: preprocess(cfg))
    for stage in cfg.stages:
        done = lambda s=stage: (stage_dir(cfg, s) / "model.safetensors").is_file()  # noqa: E731
        result = steps.run(f"stage {stage} (Ray Train)", done,
                           lambda s=stage: train(cfg, s, parent, uri))
        if result is not None:
            state[f"stage{stage}_run_id"] = result.run_id
            if not result.complete:
                print(f"==> stage {stage} stopped at its time limit at step {int(result.metrics.get('step', 0))}; "
                      "run the same command again (without --force) to resume it", flush=True)
                return False
    metrics = steps.run("evaluation (Ray Data actors)", lambda: (cfg.root / "eval" / "summary.json").is_file(),
                        lambda: evaluate(cfg, parent, uri, force=steps.force))
    if metrics is None:
        metrics = json.loads((cfg.root / "eval" / "summary.json").read_text())
    run_ids = [state[f"stage{s}_run_id"] for s in cfg.stages]
    if len(run_ids) > 1 and all(run_ids):
        steps.run("MLflow comparison of the stages", lambda: (cfg.root / "compare" / "stages.png").is_file(),
                  lambda: compare(cfg, run_ids, uri))
    answers = [] if args.no_serve else steps.run("Ray Serve + HTTP OCR requests", lambda: False,
                                                 lambda: serve_and_ask(cfg))
    tracking.log_metrics(parent, {f"eval_{split}_{k}": v for split, m in metrics.items() for k, v in m.items()
                                  if isinstance(v, (int, float)) and "/" not in k}, tracking_uri=uri)
    for answer in answers or []:
        tracking.log_metrics(parent, {f"demo_{answer['split']}_cer": answer["cer"]}, tracking_uri=uri)
    total = time.perf_counter() - start
    print("\n" + "=" * 72)
    print("nano-deepseek-ocr speedrun finished in %.0f s" % total)
    for name, seconds, skipped in steps.timings:
        print(f"  {name:<36} {'skipped' if skipped else f'{seconds:7.1f} s'}")
    print(f"  shards       {cfg.root / 'shards'}")
    print("  checkpoints  " + "\n               ".join(str(stage_dir(cfg, s)) for s in cfg.stages))
    print(f"  evaluation   {cfg.root / 'eval'}   comparison {cfg.root / 'compare' / 'stages.png'}")
    print(f"  MLflow UI    mlflow ui --backend-store-uri {uri}   (pipeline run {parent})")
    if answers:
        print(f"  Serve URL    http://127.0.0.1:{cfg.serve_port}/v1/ocr  (stopped when this job exits)")
        for a in answers:
            print(f"  {a['split']:<8} page {a['id']}: CER {a['cer']:.3f} exact={a['exact']} boxes={a['n_boxes']} "
                  f"-> {a['markdown']}, {a['boxes_image']}")
    print("=" * 72, flush=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
