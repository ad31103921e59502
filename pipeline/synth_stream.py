"""Synthetic pages rendered on the fly: a Ray Data stream of training rows, no files.

Why: a model that must learn to *read* needs hundreds of thousands of distinct pages, more
than is worth writing to disk and reading back. Here Ray Data's streaming executor renders
them on the cluster's CPUs (``ray.data.range(pages) -> map_batches(render)``) while the GPU
workers train on what comes out: each page is drawn (:mod:`pipeline.synth`), put through the
resolution mode's processor and tokenized into exactly the row a Parquet shard holds
(:func:`pipeline.preprocess.shard_row`), so the trainer cannot tell the two sources apart.

Each page gives one record (a ``line``/``word``/``block`` page up to ``crops_per_page``, shuffled within
the block); its task is drawn per page from ``tasks`` (weights). Page ``i``
of ``seed`` is always the same page, so a run is reproducible; a resumed run asks for
another ``seed`` (:meth:`SynthStreamConfig.for_resume`) so that it sees fresh pages instead of
re-rendering the ones it has trained on.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

SPLIT = "train"  # the stream only ever draws training pages; held-out pages are files


@dataclass
class SynthStreamConfig:
    """What the stream renders (the ``synth:`` mapping of a training YAML)."""

    profile: str = "reading"  # a pipeline.synth profile
    pages: int = 100_000  # pages in one pass; the trainer loops over passes like epochs
    seed: int = 0
    mode: str = "small"  # resolution mode of the processor
    tasks: dict[str, float] = field(default_factory=lambda: {"markdown": 0.5, "free": 0.5})
    overrides: dict[str, Any] = field(default_factory=dict)  # SynthConfig fields
    pages_per_task: int = 32  # pages one Ray task renders (a block of the stream)
    crops_per_page: int = 1  # crop-task pages: up to this many crops each (rendering a page costs more than a crop)
    # line/word/block crops: "crop" resized to the view (larger text than the page's), "page" left where
    # they were on a page-sized canvas, at the page's text size, "zoom" a size drawn between the two
    # (pipeline.synth.piece_layout)
    crop_scale: str = "crop"
    # at most this many render tasks at once (None: Ray Data's choice, a task per free CPU). Fewer leave
    # CPUs to the trainer's own threads: with all 16 of a GPU machine's CPUs rendering, a tier-2 step
    # slowed ~8% while the stream's buffer was full (bench/RESULTS.md, session 27)
    render_tasks: int | None = None

    def __post_init__(self) -> None:
        from model.config import MODES
        from pipeline.synth import CROP_SCALES, TASKS

        if self.pages < 1:
            raise ValueError(f"synth.pages must be >= 1, got {self.pages}")
        if self.pages_per_task < 1:
            raise ValueError(f"synth.pages_per_task must be >= 1, got {self.pages_per_task}")
        if self.crops_per_page < 1:
            raise ValueError(f"synth.crops_per_page must be >= 1, got {self.crops_per_page}")
        if self.render_tasks is not None and self.render_tasks < 1:
            raise ValueError(f"synth.render_tasks must be >= 1 (or unset), got {self.render_tasks}")
        if self.crop_scale not in CROP_SCALES:
            raise ValueError(f"synth.crop_scale must be one of {', '.join(CROP_SCALES)}, got {self.crop_scale!r}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks or any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError(f"synth.tasks must weight some of {TASKS} (>= 0, some > 0), got {self.tasks}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {sorted(MODES)}")
        self.synth_config().validate()  # an unknown profile or override field fails here, on the driver

    def synth_config(self):
        from pipeline.synth import SynthConfig

        return SynthConfig.from_yaml_overrides(self.profile, self.overrides, "synth.overrides", seed=self.seed)

    def for_resume(self, step: int) -> "SynthStreamConfig":
        """The stream a run resumed at ``step`` reads: other pages than the first attempt."""
        return dataclasses.replace(self, seed=self.seed + 1_000_003 * step) if step else self


@dataclass
class _RenderSpec:
    stream: SynthStreamConfig
    tokenizer_json: str
    max_seq_len: int
    glyphs: bool = False  # add a GLYPHS_COLUMN (pipeline.glyphs) for the trainer's glyph loss


GLYPHS_COLUMN = "glyphs"  # where each character of the global view lies (pipeline.glyphs.encode_glyphs)


def _draw(index: int, stream: SynthStreamConfig, synth) -> tuple[Any, str, random.Random]:
    """Stream page ``index``, the task drawn for it and the generator that goes on to pick its crop."""
    from pipeline.synth import make_page

    page = make_page(index, synth or stream.synth_config(), stream.seed, SPLIT)
    rng = random.Random(f"ndocr-stream-task/{stream.seed}/{index}")
    tasks, weights = zip(*stream.tasks.items())
    return page, rng.choices(tasks, weights)[0], rng


def _crop_sample(page, task: str, k: int, piece, crop_scale: str = "crop") -> tuple[Any, dict]:
    """(image, record) of crop ``k`` of ``page`` as ``crop_scale`` shows it."""
    from pipeline.synth import crop_record, piece_image

    record = crop_record(page, task, k, piece.text, f"stream/{page.page_id}-{task}{k:03d}.png", SPLIT)
    return piece_image(page.image, piece, crop_scale, page.page_id), record


def _page_sample(page, task: str) -> tuple[Any, dict]:
    """(image, record) of the whole page; a crop task on a page without text (figures only) reads it whole."""
    from pipeline.synth import CROP_TASKS, page_records

    task = "free" if task in CROP_TASKS else task
    return page.image, page_records(page, f"stream/{page.page_id}.png", (task,), SPLIT)[0]


def render_sample(index: int, stream: SynthStreamConfig, synth=None) -> tuple[Any, Any, dict]:
    """(page, image, record) of stream page ``index`` and the task drawn for it.

    Page tasks show the whole page; ``line``/``word``/``block`` show one crop of it (a curriculum starts
    there: one line of text is read without having to find it on the page first). The page
    itself comes along for callers that need its boxes (the recipe probes' cell targets).
    """
    page, _, image, record = render_piece_sample(index, stream, synth)
    return page, image, record


def render_piece_sample(index: int, stream: SynthStreamConfig, synth=None) -> tuple[Any, Any, Any, dict]:
    """(page, the cropped line, word or block or None, image, record) of stream page ``index``: what
    :func:`render_sample` gives, with the piece a glyph target is computed from."""
    from pipeline.synth import crop_pieces

    page, task, rng = _draw(index, stream, synth)
    pieces = crop_pieces(page, task)
    if pieces:
        k = rng.randrange(len(pieces))
        return (page, pieces[k], *_crop_sample(page, task, k, pieces[k], stream.crop_scale))
    return (page, None, *_page_sample(page, task))


def sample_glyphs(page, piece, task: str, view_size: int, crop_scale: str = "crop"):
    """The glyphs (:func:`pipeline.glyphs.page_glyphs`) of a stream sample's global view: of the
    whole page, or of the crop of ``piece`` for a ``line``/``word``/``block`` sample as ``crop_scale`` shows it."""
    from pipeline.glyphs import crop_page, page_glyphs

    shown = page if piece is None else crop_page(page, task, piece, crop_scale)
    return page_glyphs(shown, view_size)


def render_crops(index: int, stream: SynthStreamConfig, synth=None,
                 limit: int | None = None) -> tuple[Any, list[tuple[Any, dict]]]:
    """The page of :func:`render_sample` and every (image, record) it offers for its task: its
    readable crops for ``line``/``word``/``block`` (at most ``limit``, drawn per page), the page itself
    otherwise. A consumer that can use many crops of one page renders it once, not once per crop."""
    page, samples = render_crop_pieces(index, stream, synth, limit)
    return page, [(image, record) for _, image, record in samples]


def render_crop_pieces(index: int, stream: SynthStreamConfig, synth=None,
                       limit: int | None = None) -> tuple[Any, list[tuple[Any, Any, dict]]]:
    """:func:`render_crops` with each sample's cropped piece (None for the page itself): what the
    glyph targets of a crop are computed from."""
    from pipeline.synth import crop_pieces

    page, task, rng = _draw(index, stream, synth)
    pieces = crop_pieces(page, task)
    if not pieces:
        return page, [(None, *_page_sample(page, task))]
    ks = range(len(pieces))
    if limit is not None and limit < len(pieces):
        ks = sorted(rng.sample(ks, limit))
    return page, [(pieces[k], *_crop_sample(page, task, k, pieces[k], stream.crop_scale)) for k in ks]


def _block_samples(indices: list[int], stream: SynthStreamConfig, synth) -> list[tuple[Any, Any, Any, dict]]:
    """(page, piece, image, record) of a block of stream pages: one sample per page, or with
    ``crops_per_page`` > 1 up to that many crops of each line/word/block page, shuffled across the
    block (seeded by its first page) so that one page's crops do not fill a packed row."""
    if stream.crops_per_page == 1:
        return [render_piece_sample(i, stream, synth) for i in indices]
    out = []
    for i in indices:
        page, samples = render_crop_pieces(i, stream, synth, stream.crops_per_page)
        out += [(page, *sample) for sample in samples]
    random.Random(f"ndocr-stream-block/{stream.seed}/{indices[0] if indices else 0}").shuffle(out)
    return out


def render_record(index: int, stream: SynthStreamConfig, synth=None) -> tuple[Any, dict]:
    """(image, record) of stream page ``index``: :func:`render_sample` without the page."""
    return render_sample(index, stream, synth)[1:]


def render_batch(batch: Mapping[str, np.ndarray], spec: _RenderSpec) -> pa.Table:
    """Ray Data UDF: page indices -> shard rows (records over ``max_seq_len`` are dropped; several
    per line/word/block page with ``crops_per_page``), with a :data:`GLYPHS_COLUMN` when ``spec.glyphs``."""
    from model.processor import ImageProcessor
    from pipeline.glyphs import encode_glyphs
    from pipeline.preprocess import rows_to_table, shard_row, worker_tokenizer

    tokenizer = worker_tokenizer(spec.tokenizer_json)
    processor = ImageProcessor.from_mode(spec.stream.mode)
    synth = spec.stream.synth_config()
    rows, glyphs = [], []
    for page, piece, image, rec in _block_samples([int(i) for i in batch["id"].tolist()], spec.stream, synth):
        p = processor.process(image)
        ids, mask = tokenizer.render_vision(rec["prompt"], rec["response"], p.n_image_tokens)
        if len(ids) > spec.max_seq_len:
            continue  # rare with the page profiles; the packer would refuse the row anyway
        rows.append(shard_row(rec["id"], rec["task"], ids, mask, mode=p.mode, global_view=p.global_view,
                              tiles=p.tiles, spatial_crop=p.spatial_crop, n_image_tokens=p.n_image_tokens))
        if spec.glyphs:
            glyphs.append(encode_glyphs(sample_glyphs(page, piece, rec["task"], p.global_view.shape[0],
                                                      spec.stream.crop_scale)))
    table = rows_to_table(rows)
    return table.append_column(GLYPHS_COLUMN, pa.array(glyphs, pa.binary())) if spec.glyphs else table


def synth_dataset(stream: SynthStreamConfig, tokenizer_json: str, max_seq_len: int, glyphs: bool = False):
    """A Ray Dataset of ``stream.pages`` freshly rendered training rows (lazy: nothing runs yet);
    ``glyphs`` adds where each character lies (the trainer's ``glyph_loss``)."""
    import ray.data

    spec = _RenderSpec(stream, tokenizer_json, max_seq_len, glyphs)
    blocks = max(1, -(-stream.pages // stream.pages_per_task))
    pool = ray.data.TaskPoolStrategy(size=stream.render_tasks)  # size None: no cap
    return ray.data.range(stream.pages, override_num_blocks=blocks).map_batches(
        render_batch, fn_kwargs={"spec": spec}, batch_size=stream.pages_per_task, batch_format="numpy", compute=pool)


def stream_texts(stream: SynthStreamConfig, n_pages: int) -> list[str]:
    """Prompts and responses of the stream's first pages: text to train a tokenizer on."""
    from pipeline.synth import make_page, page_records

    synth = stream.synth_config()
    texts: list[str] = []
    for i in range(n_pages):
        page = make_page(i, synth, stream.seed, SPLIT)
        for rec in page_records(page, "", ("markdown", "free"), SPLIT):
            texts += [rec["prompt"], rec["response"]]
    return texts
