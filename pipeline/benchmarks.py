"""Evaluation sets as eval records: our manifests, Fox page OCR, OmniDocBench.

Every loader returns records in the synth manifest shape, with ``image`` resolved to an
absolute path: ``{id, image, prompt, response, task, boxes: [{label, box 0..999}], source}``.

- Fox (``ucaslcl/Fox``, e.g. ``en_page_ocr.json``): a JSON list of
  ``{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": text}]}``; images live in a folder passed separately
  (``en_pdf_png/``). Records use our ``free`` task prompt (Fox's own prompt is kept as
  ``source_prompt``); there are no boxes.
- OmniDocBench (``opendatalab/OmniDocBench``, ``OmniDocBench.json`` + ``images/``): a list of
  pages ``{"layout_dets": [{category_type, poly [8 numbers], ignore, order, text | latex |
  html, ...}], "page_info": {image_path, width, height, page_no, ...}}``. Blocks are taken in
  reading order (``order``), ``ignore``d ones and page furniture (headers, footers, page
  numbers, ``abandon``) are left out as in OmniDocBench's end-to-end text evaluation, boxes
  are the poly's bounds scaled to 0..999, tables contribute their HTML and equations their
  LaTeX. ``markdown`` records carry the grounding-format response; ``free`` ones plain text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from model.grounding import COORD_MAX, format_grounding
from model.tasks import prompt_for

PathLike = str | os.PathLike

# OmniDocBench category -> DeepSeek-OCR grounding label.
OMNIDOC_LABELS = {
    "title": "title",
    "text_block": "text",
    "figure": "image",
    "figure_caption": "image_caption",
    "figure_footnote": "image_footnote",
    "table": "table",
    "table_caption": "table_caption",
    "table_footnote": "table_footnote",
    "equation_isolated": "equation",
    "equation_caption": "equation_caption",
    "code_txt": "code",
    "code_txt_caption": "code_caption",
    "reference": "text",
    "header": "header",
    "footer": "footer",
    "page_number": "page_number",
    "page_footnote": "page_footnote",
}
# Left out of the text and box targets (OmniDocBench ignores them in end-to-end text scoring).
OMNIDOC_SKIP = frozenset({"header", "footer", "page_number", "page_footnote", "abandon", "equation_ignore",
                          "text_span", "equation_inline", "footnote_mark", "need_mask"})


class BenchmarkFormatError(ValueError):
    """A benchmark file that does not have the expected layout."""


# --------------------------------------------------------------------------- our manifests


def load_manifest(path: PathLike, tasks: Sequence[str] | None = None, limit: int | None = None) -> list[dict]:
    """JSONL eval records with ``image`` resolved against the manifest's directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval manifest {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{path}:{n}: not JSON ({e})") from None
        missing = [k for k in ("id", "image", "prompt", "response") if k not in r]
        if missing:
            raise BenchmarkFormatError(f"{path}:{n}: record lacks {missing} (need id, image, prompt, response)")
        r = dict(r)
        if "://" not in str(r["image"]):
            r["image"] = str((path.parent / r["image"]).resolve())
        r.setdefault("task", "free")
        r.setdefault("boxes", [])
        r.setdefault("source", "manifest")
        out.append(r)
    return _select(out, tasks, limit)


def _select(records: list[dict], tasks: Sequence[str] | None, limit: int | None) -> list[dict]:
    if tasks:
        records = [r for r in records if r.get("task") in set(tasks)]
    return records[:limit] if limit is not None else records


# ------------------------------------------------------------------------------------- Fox


def load_fox(json_path: PathLike, image_dir: PathLike | None = None, limit: int | None = None,
             task: str = "free") -> list[dict]:
    """Fox page-OCR ground truth (``en_page_ocr.json`` / ``cn_page_ocr.json``) as eval records.

    ``image_dir`` is the folder Fox's ``--image_path`` names (default: the JSON's folder).
    """
    json_path = Path(json_path)
    data = _read_json_list(json_path, "Fox")
    image_root = Path(image_dir) if image_dir is not None else json_path.parent
    out = []
    for i, item in enumerate(data):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or "image" not in item:
            raise BenchmarkFormatError(f"{json_path}[{i}]: expected {{'image', 'conversations'}} (Fox layout)")
        human = next((c.get("value", "") for c in conv if c.get("from") == "human"), "")
        answer = next((c.get("value") for c in conv if c.get("from") == "gpt"), None)
        if answer is None:
            raise BenchmarkFormatError(f"{json_path}[{i}]: no 'gpt' turn with the reference text")
        out.append({
            "id": f"fox-{Path(item['image']).stem}-{i}",
            "image": str((image_root / item["image"]).resolve()),
            "prompt": prompt_for(task),
            "response": answer,
            "task": task,
            "boxes": [],
            "source": "fox",
            "source_prompt": human,
        })
    return out[:limit] if limit is not None else out


# ---------------------------------------------------------------------------- OmniDocBench


def poly_to_box(poly: Sequence[float], width: float, height: float) -> list[int]:
    """Bounds of an 8-number polygon (pixels) as ``[x1, y1, x2, y2]`` in 0..999 (inverse of ``v/999*W``)."""
    if len(poly) < 8 or len(poly) % 2:
        raise BenchmarkFormatError(f"poly {list(poly)} needs 8 numbers (4 corners x, y)")
    if width <= 0 or height <= 0:
        raise BenchmarkFormatError(f"page size {width}x{height} must be positive")
    xs, ys = poly[0::2], poly[1::2]

    def scale(v: float, size: float) -> int:
        return min(COORD_MAX, max(0, int(round(v / size * COORD_MAX))))

    return [scale(min(xs), width), scale(min(ys), height), scale(max(xs), width), scale(max(ys), height)]


def _block_content(det: dict) -> str:
    cat = det.get("category_type", "")
    if cat == "table":
        return (det.get("html") or det.get("latex") or det.get("text") or "").strip()
    if cat == "equation_isolated":
        latex = (det.get("latex") or det.get("text") or "").strip()
        return latex
    if cat == "figure":
        return ""
    return (det.get("text") or "").strip()


def omnidoc_page_records(page: dict, image_root: Path, index: int = 0,
                         tasks: Sequence[str] = ("markdown",), skip: Iterable[str] = OMNIDOC_SKIP) -> list[dict]:
    """Eval records (one per task) of one OmniDocBench page."""
    info = page.get("page_info")
    dets = page.get("layout_dets")
    if not isinstance(info, dict) or not isinstance(dets, list):
        raise BenchmarkFormatError(f"page {index}: expected 'page_info' and 'layout_dets' (OmniDocBench layout)")
    try:
        width, height = float(info["width"]), float(info["height"])
        image_path = str(info["image_path"])
    except KeyError as e:
        raise BenchmarkFormatError(f"page {index}: page_info lacks {e}") from None
    skip = set(skip)
    kept = [d for d in dets if not d.get("ignore", False) and d.get("category_type") not in skip]
    # reading order; blocks without an order go last, in file order
    kept = [d for _, d in sorted(enumerate(kept), key=lambda t: (t[1].get("order") is None,
                                                                  t[1].get("order") or 0, t[0]))]
    boxes, grounded, plain = [], [], []
    for d in kept:
        label = OMNIDOC_LABELS.get(d.get("category_type", ""), d.get("category_type", "") or "text")
        box = poly_to_box(d["poly"], width, height)
        content = _block_content(d)
        boxes.append({"label": label, "box": box})
        grounded.append(f"{format_grounding(label, [box])}\n{content}")
        if content:
            plain.append(content)
    stem = Path(image_path).stem
    image = (image_root / Path(image_path).name).resolve()
    out = []
    for task in tasks:
        response = "\n\n".join(grounded) if task in ("markdown", "grounding") else "\n\n".join(plain)
        out.append({
            "id": f"omnidoc-{stem}-{task}",
            "image": str(image),
            "prompt": prompt_for(task),
            "response": response,
            "task": task,
            "boxes": boxes,
            "source": "omnidocbench",
            "page_attribute": info.get("page_attribute", {}),
        })
    return out


def load_omnidocbench(json_path: PathLike, image_dir: PathLike | None = None, limit: int | None = None,
                      tasks: Sequence[str] = ("markdown",), skip: Iterable[str] = OMNIDOC_SKIP) -> list[dict]:
    """``OmniDocBench.json`` as eval records; images from ``image_dir`` (default ``<json dir>/images``)."""
    json_path = Path(json_path)
    pages = _read_json_list(json_path, "OmniDocBench")
    root = Path(image_dir) if image_dir is not None else json_path.parent / "images"
    out = []
    for i, page in enumerate(pages[:limit] if limit is not None else pages):
        out += omnidoc_page_records(page, root, i, tasks, skip)
    return out


# ----------------------------------------------------------------------------- dispatching


def _read_json_list(path: Path, what: str) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"{what} ground truth {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of {what} entries, got {type(data).__name__}")
    return data


def detect_format(path: PathLike) -> str:
    """``manifest`` (JSONL), ``fox`` or ``omnidocbench`` from a file's name and first entry."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return "manifest"
    data = _read_json_list(path, "benchmark")
    first: Any = data[0] if data else {}
    if isinstance(first, dict) and "layout_dets" in first:
        return "omnidocbench"
    if isinstance(first, dict) and "conversations" in first:
        return "fox"
    raise BenchmarkFormatError(f"{path}: neither a JSONL manifest nor a Fox / OmniDocBench JSON list")


def load_eval_records(path: PathLike, image_dir: PathLike | None = None, tasks: Sequence[str] | None = None,
                      limit: int | None = None) -> list[dict]:
    """Eval records from any supported file (see :func:`detect_format`)."""
    fmt = detect_format(path)
    if fmt == "manifest":
        return load_manifest(path, tasks, limit)
    if fmt == "fox":
        return _select(load_fox(path, image_dir), tasks, limit)
    return load_omnidocbench(path, image_dir, limit, tasks=tasks or ("markdown",))


def write_manifest(records: Iterable[dict], path: PathLike) -> Path:
    """Write records as JSONL (absolute image paths stay absolute)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
