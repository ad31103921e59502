"""Ray Data: record manifests -> decoded, tiled, tokenized rows -> Parquet shards.

The job (``jobs/preprocess.py`` calls :func:`run_preprocess`):

1. reads every manifest (JSONL as text lines, or Parquet) from a local path or ``s3://``
   into rows ``{record (JSON), base (the manifest's directory)}``;
2. gets a tokenizer: ``--tokenizer PATH``, or one trained on the manifests' text; either
   way it is saved as ``out/tokenizer.json`` so training reads the same one;
3. in parallel Ray tasks, validates each record (:mod:`pipeline.records`), reads and
   decodes its image, applies the resolution mode's processor and renders the token ids
   (vision: ``render_vision``; text: ``render_conversation``);
4. writes good rows to ``out/part-*.parquet`` (at most ``rows_per_file`` each; a small job
   is cut into about two tasks per CPU, so its files are smaller) and bad rows to
   ``out/errors/part-*.parquet`` with their id, reason and message, in the same tasks that
   processed them (Ray fuses processing and writing: no image bytes cross the object store);
5. writes ``out/stats.json`` (rows in/out, failures by reason, image-token histogram,
   bytes, seconds) and fails with :class:`PreprocessError` only when the failed fraction
   exceeds ``max_error_fraction`` (the shards stay; stats.json says ``"status": "failed"``).

A previous run's shards, errors and stats in ``out`` are removed first (only those files).

Shard row (DESIGN.md): ``id, task, input_ids (int32 list), loss_mask (uint8 list), mode,
global_view (uint8 HxWx3 bytes) + global_shape, tiles (uint8 NxHxWx3 bytes) + tiles_shape,
spatial_crop [cols, rows], n_image_tokens``. Images are plain binary + shape columns (not
Ray's tensor extension types) so any Parquet reader sees them as they are. Text rows have
null image columns and ``n_image_tokens = 0``. :func:`read_shards` and :func:`decode_row`
turn shards back into arrays for training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from model.config import preset as model_preset
from model.config import processor_config
from model.processor import ImageError, ImageProcessor
from model.tokenizer import SPECIAL_TOKENS, Tokenizer
from pipeline import storage
from pipeline.records import RecordError, TextRecord, parse_record, record_id_of

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("task", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.uint8())),
    ("mode", pa.string()),
    ("global_view", pa.large_binary()),  # uint8 H*W*3, C order; null for text rows
    ("global_shape", pa.list_(pa.int32())),  # [H, W, 3]
    ("tiles", pa.large_binary()),  # uint8 N*h*w*3 (empty when N = 0)
    ("tiles_shape", pa.list_(pa.int32())),  # [N, h, w, 3]
    ("spatial_crop", pa.list_(pa.int32())),  # [cols, rows]
    ("n_image_tokens", pa.int32()),
])
VIEW_COLUMNS = ("global_view", "tiles")  # the shard columns that hold megabytes of pixels per row
ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()),  # null when the record was not even JSON
    ("reason", pa.string()),  # a key of pipeline.records.ERROR_REASONS
    ("message", pa.string()),
    ("manifest", pa.string()),  # the manifest the record came from
    ("image", pa.string()),  # resolved image path/URI, when there was one
])
_ERROR_COLS = ("_error_reason", "_error_message", "_manifest", "_image")
_ROW_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [pa.field(c, pa.string()) for c in _ERROR_COLS])
_RECORDS_SCHEMA = pa.schema([("record", pa.string()), ("base", pa.string()), ("manifest", pa.string())])

SHARD_GLOB_PREFIX = "part-"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
ERRORS_DIR = "errors"
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


class PreprocessError(RuntimeError):
    """The job ran but too many records failed (or none were found); ``result`` has the stats."""

    def __init__(self, message: str, result: "PreprocessResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class PreprocessConfig:
    """What ``jobs/preprocess.py`` runs; YAML keys and flags use these names (``-`` or ``_``)."""

    manifests: list[str] = field(default_factory=list)  # JSONL / Parquet files or Parquet dirs; local or s3://
    out: str = "artifacts/shards"
    mode: str = "tiny"  # resolution mode: tiny/small/base/large/gundam
    preset: str = "tiny"  # model preset: default vocab_size and max_seq_len
    max_crops: int | None = None  # processor default (9) when unset
    tokenizer: str | None = None  # tokenizer.json to use; unset: train one on the manifests
    vocab_size: int | None = None  # for a trained tokenizer; default: the preset's
    max_seq_len: int | None = None  # longer rows are errors; default: the preset's sequence_len
    rows_per_file: int = 256
    max_error_fraction: float = 0.05
    max_pixels: int | None = None  # processor default (50M) when unset
    max_image_bytes: int = 256 * 1024 * 1024
    batch_size: int = 8  # records per map_batches call
    compression: str = "zstd"
    row_group_rows: int = 32  # Parquet row group size: bounds reader memory with big images

    def __post_init__(self) -> None:
        if isinstance(self.manifests, str):
            self.manifests = [self.manifests]
        self.manifests = [str(m) for m in self.manifests]

    def validate(self) -> None:
        if not self.manifests:
            raise ValueError("no manifest given (--manifest PATH [PATH ...])")
        if not self.out:
            raise ValueError("no output directory given (--out)")
        processor_config(self.mode)  # raises on unknown modes
        model_preset(self.preset)
        for name in ("rows_per_file", "batch_size", "row_group_rows", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be within [0, 1], got {self.max_error_fraction}")

    def resolved_max_seq_len(self) -> int:
        return self.max_seq_len or model_preset(self.preset).gpt.sequence_len

    def resolved_vocab_size(self) -> int:
        return self.vocab_size or model_preset(self.preset).gpt.vocab_size


def load_preprocess_config(path: str | None = None, **overrides: Any) -> PreprocessConfig:
    """YAML values (keys mirror the flags) overridden by non-None ``overrides``."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        loaded = yaml.safe_load(storage.read_text(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of preprocess settings")
        values.update({_key(k): v for k, v in loaded.items()})
        values.pop("address", None)  # a job-level key (the Ray address), read by jobs/preprocess.py
    values.update({_key(k): v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown preprocess settings: {sorted(unknown)}; known: {sorted(known)}")
    return PreprocessConfig(**values)


def _key(name: str) -> str:
    key = str(name).replace("-", "_")
    return "manifests" if key == "manifest" else key  # the flag is --manifest


@dataclass
class PreprocessResult:
    stats: dict[str, Any]
    out: str
    shard_files: list[str]
    errors_path: str | None  # out/errors when any record failed
    stats_path: str
    tokenizer_path: str

    @property
    def rows_out(self) -> int:
        return int(self.stats["rows_out"])

    @property
    def rows_failed(self) -> int:
        return int(self.stats["rows_failed"])


# ------------------------------------------------------------------------ manifests


def _is_parquet_manifest(uri: str) -> bool:
    return uri.endswith(".parquet") or storage.is_dir(uri)


def _manifest_base(uri: str) -> str:
    return uri if storage.is_dir(uri) else storage.parent(uri)


def _ray_fs(uri: str, s3fs_obj: Any) -> tuple[Any, str]:
    """(filesystem for Ray readers, path spelled for it): the driver-built s3fs for S3."""
    if storage.is_remote(uri):
        return s3fs_obj, uri[len("s3://"):]
    return None, uri


def _lines_to_records(batch: pa.Table, base: str, manifest: str) -> pa.Table:
    lines = [s for s in batch.column("text").to_pylist() if s is not None and s.strip()]
    return pa.table({"record": lines, "base": [base] * len(lines), "manifest": [manifest] * len(lines)},
                    schema=_RECORDS_SCHEMA)


def _parquet_to_records(batch: pa.Table, base: str, manifest: str) -> pa.Table:
    rows = [json.dumps(r, default=_json_default, ensure_ascii=False) for r in batch.to_pylist()]
    return pa.table({"record": rows, "base": [base] * len(rows), "manifest": [manifest] * len(rows)},
                    schema=_RECORDS_SCHEMA)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_manifests(manifests: Sequence[str], s3fs_obj: Any = None) -> "ray.data.Dataset":
    """One dataset of ``{record: JSON text, base: manifest dir, manifest: its URI}`` over all manifests."""
    parts = []
    for raw in manifests:
        uri = storage.normalize(raw)
        if not storage.exists(uri):
            raise FileNotFoundError(f"manifest {uri} does not exist")
        fs, path = _ray_fs(uri, s3fs_obj)
        base = _manifest_base(uri)
        if _is_parquet_manifest(uri):
            ds = read_parquet_v1(path, filesystem=fs)
            fn = _parquet_to_records
        else:
            ds = ray.data.read_text(path, filesystem=fs, drop_empty_lines=True)
            fn = _lines_to_records
        parts.append(ds.map_batches(fn, fn_kwargs={"base": base, "manifest": uri}, batch_format="pyarrow",
                                    batch_size=None))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def record_texts(record_json: str) -> list[str]:
    """The plain text of a record (special tokens removed) for tokenizer training."""
    try:
        rec = json.loads(record_json)
    except ValueError:
        return []
    if not isinstance(rec, dict):
        return []
    texts: list[Any] = [rec.get("prompt"), rec.get("response")]
    for m in rec.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            texts.extend(p.get("text") for p in content if isinstance(p, dict))
        else:
            texts.append(content)
    return [_SPECIAL_RE.sub(" ", t) for t in texts if isinstance(t, str) and t]


def _iter_texts(records: "ray.data.Dataset", counter: list[int]) -> Iterator[str]:
    """Texts of all records; counts the records into ``counter[0]`` on the way (one pass)."""
    for batch in records.iter_batches(batch_size=1024, batch_format="pyarrow"):
        counter[0] += batch.num_rows
        for rec in batch.column("record").to_pylist():
            yield from record_texts(rec)


# ------------------------------------------------------------------------ per-record work


@dataclass
class _Spec:
    """Everything a processing task needs; pickled once into the Ray Data operator."""

    tokenizer_json: str
    mode: str
    max_crops: int | None
    max_pixels: int | None
    max_seq_len: int
    max_image_bytes: int
    s3fs: Any = None  # driver-built s3fs (credentials + endpoint) or None
    tokenizer_key: str = ""

    def __post_init__(self) -> None:
        self.tokenizer_key = hashlib.sha1(self.tokenizer_json.encode("utf-8")).hexdigest()


class RecordProcessor:
    """Record -> shard row dict, or :class:`RecordError`. Used by the Ray tasks and the bench."""

    def __init__(self, tokenizer: Tokenizer, processor: ImageProcessor, max_seq_len: int,
                 max_image_bytes: int = 256 * 1024 * 1024, s3fs_obj: Any = None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_seq_len = max_seq_len
        self.max_image_bytes = max_image_bytes
        self._s3fs = s3fs_obj
        self._local = None

    def _read_image(self, uri: str) -> bytes:
        if storage.is_remote(uri):
            if self._s3fs is None:
                self._s3fs = storage.s3_filesystem()
            fs, path = self._s3fs, uri[len("s3://"):]
        else:
            if self._local is None:
                import fsspec

                self._local = fsspec.filesystem("file")
            fs, path = self._local, uri
        try:
            return storage.read_bytes(path, max_bytes=self.max_image_bytes, fs=fs)
        except FileNotFoundError:
            raise RecordError("missing", f"no such image file: {uri}") from None
        except IsADirectoryError:
            raise RecordError("unreadable", f"{uri} is a directory, not an image") from None
        except ValueError as exc:
            raise RecordError("too_large", str(exc)) from None
        except OSError as exc:
            raise RecordError("unreadable", f"cannot read {uri}: {exc}") from None

    def process(self, record_json: str | Mapping[str, Any], base: str) -> dict[str, Any]:
        """The shard row of one record; raises RecordError (with reason) for bad records."""
        rec = parse_record(record_json)
        if isinstance(rec, TextRecord):
            try:
                ids, mask = self.tokenizer.render_conversation(rec.messages)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise RecordError("bad_record", f"conversation cannot be rendered: {exc}", rec.id) from None
            self._check_len(len(ids), rec.id)
            return shard_row(rec.id, rec.task, ids, mask)
        try:
            uri = storage.resolve(rec.image, base)
        except storage.StorageError as exc:
            raise RecordError("bad_record", str(exc), rec.id) from None
        try:
            data = self._read_image(uri)
            try:
                p = self.processor.process(data)
            except ImageError as exc:
                msg = str(exc)
                msg = msg[len(exc.reason) + 2:] if msg.startswith(exc.reason + ": ") else msg
                raise RecordError(exc.reason, f"{uri}: {msg}") from None
        except RecordError as exc:
            exc.record_id, exc.image = rec.id, uri
            raise
        try:
            ids, mask = self.tokenizer.render_vision(rec.prompt, rec.response, p.n_image_tokens)
        except ValueError as exc:
            raise RecordError("bad_record", f"cannot render tokens: {exc}", rec.id) from None
        self._check_len(len(ids), rec.id)
        return shard_row(rec.id, rec.task, ids, mask, mode=p.mode, global_view=p.global_view, tiles=p.tiles,
                    spatial_crop=p.spatial_crop, n_image_tokens=p.n_image_tokens)

    def _check_len(self, n: int, rid: str) -> None:
        if n > self.max_seq_len:
            raise RecordError("too_long", f"{n} tokens exceed max_seq_len={self.max_seq_len}", rid)


def shard_row(rid: str, task: str, ids: Sequence[int], mask: Sequence[int], mode: str | None = None,
         global_view: np.ndarray | None = None, tiles: np.ndarray | None = None,
         spatial_crop: Sequence[int] | None = None, n_image_tokens: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": rid, "task": task,
        "input_ids": np.asarray(ids, dtype=np.int32), "loss_mask": np.asarray(mask, dtype=np.uint8),
        "mode": mode, "global_view": None, "global_shape": None, "tiles": None, "tiles_shape": None,
        "spatial_crop": None, "n_image_tokens": int(n_image_tokens),
    }
    if global_view is not None:
        row["global_view"] = np.ascontiguousarray(global_view, dtype=np.uint8).tobytes()
        row["global_shape"] = list(global_view.shape)
        row["tiles"] = np.ascontiguousarray(tiles, dtype=np.uint8).tobytes()
        row["tiles_shape"] = list(tiles.shape)
        row["spatial_crop"] = [int(v) for v in spatial_crop]
    return row


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Shard rows (dicts from :meth:`RecordProcessor.process`) as an Arrow table of SHARD_SCHEMA."""
    cols = {name: [r[name] for r in rows] for name in SHARD_SCHEMA.names}
    cols["input_ids"] = _int_lists(cols["input_ids"], pa.int32())
    cols["loss_mask"] = _int_lists(cols["loss_mask"], pa.uint8())
    for name in VIEW_COLUMNS:
        cols[name] = _large_binary(cols[name])
    return pa.table(cols, schema=SHARD_SCHEMA)


def _large_binary(values: Sequence[bytes | None]) -> pa.Array:
    """A large_binary array built with one copy of each value into one buffer.

    Why: ``pa.array`` on a list of multi-megabyte ``bytes`` grows its buffer as it appends, ~300 MB/s
    here; a base-mode view is 3 MB, and this made 41% of the synthetic stream's render time
    (bench/stream.py, line crops in ``base`` mode).
    """
    n = len(values)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    lengths = np.fromiter((len(v) if v is not None else 0 for v in values), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    for value, start, length in zip(values, offsets[:-1].tolist(), lengths.tolist()):
        if length:
            data[start:start + length] = np.frombuffer(value, dtype=np.uint8)
    nulls = n - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.large_binary(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=nulls)


def binary_views(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """Each value of a (large_)binary Arrow column as a uint8 array over its buffer (None for nulls):
    the reverse of :func:`_large_binary`, without a copy."""
    out: list[np.ndarray | None] = []
    for chunk in column.chunks:
        _, offsets_buf, data = chunk.buffers()
        wide = chunk.type == pa.large_binary()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64 if wide else np.int32)
        offsets = offsets[chunk.offset:chunk.offset + len(chunk) + 1]
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            if not valid[i]:
                out.append(None)
            else:
                start, end = int(offsets[i]), int(offsets[i + 1])
                out.append(np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start) if end > start
                           else np.zeros(0, np.uint8))
    return out


def _int_lists(arrays: Sequence[np.ndarray], typ: pa.DataType) -> pa.Array:
    """A list<typ> array built from numpy arrays without a Python-int round trip."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat.astype(typ.to_pandas_dtype())))


_TOKENIZER_CACHE: dict[str, Tokenizer] = {}


def worker_tokenizer(tokenizer_json: str, key: str | None = None) -> Tokenizer:
    """The tokenizer of ``tokenizer_json``, parsed once per worker process (the costly part of a
    task's setup) and reused by later tasks of the same job; ``key`` defaults to its sha1."""
    key = key or hashlib.sha1(tokenizer_json.encode("utf-8")).hexdigest()
    tokenizer = _TOKENIZER_CACHE.get(key)
    if tokenizer is None:
        _TOKENIZER_CACHE.clear()
        tokenizer = _TOKENIZER_CACHE[key] = Tokenizer.from_json(tokenizer_json)
    return tokenizer


def _worker_processor(spec: _Spec) -> RecordProcessor:
    """A RecordProcessor for this spec (the tokenizer comes from the per-process cache)."""
    tokenizer = worker_tokenizer(spec.tokenizer_json, spec.tokenizer_key)
    processor = ImageProcessor.from_mode(spec.mode, max_crops=spec.max_crops, max_pixels=spec.max_pixels)
    return RecordProcessor(tokenizer, processor, spec.max_seq_len, spec.max_image_bytes, spec.s3fs)


def process_batch(batch: pa.Table, spec: _Spec) -> pa.Table:
    """Ray Data UDF: records -> rows of shard columns + error columns (null when the row is good)."""
    proc = _worker_processor(spec)
    good: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    columns = [batch.column(name).to_pylist() for name in ("record", "base", "manifest")]
    for record_json, base, manifest in zip(*columns):
        try:
            good.append(proc.process(record_json, base))
        except RecordError as exc:
            errors.append({"id": exc.record_id or record_id_of(record_json), "reason": exc.reason,
                           "message": exc.message, "manifest": manifest, "image": exc.image})
        except Exception as exc:  # never crash the job on one record; report it instead
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            errors.append({"id": record_id_of(record_json), "reason": "internal", "message": tb,
                           "manifest": manifest, "image": None})
    table = rows_to_table(good)
    null = pa.nulls(len(good), pa.string())
    table = table.append_column("_error_reason", null).append_column("_error_message", null)
    table = table.append_column("_manifest", null).append_column("_image", null)
    if errors:
        err = {name: pa.nulls(len(errors), f.type) for name, f in zip(SHARD_SCHEMA.names, SHARD_SCHEMA)}
        err["id"] = pa.array([e["id"] for e in errors], pa.string())
        err["n_image_tokens"] = pa.array([0] * len(errors), pa.int32())
        for col, key in zip(_ERROR_COLS, ("reason", "message", "manifest", "image")):
            err[col] = pa.array([e[key] for e in errors], pa.string())
        table = pa.concat_tables([table, pa.table(err, schema=_ROW_SCHEMA)])
    return table


# ------------------------------------------------------------------------ writing


def _empty_stats() -> dict[str, Any]:
    return {"rows_out": 0, "rows_failed": 0, "failures": {}, "rows_by_task": {}, "image_token_histogram": {},
            "tokens": 0, "target_tokens": 0, "shard_bytes": 0, "error_bytes": 0, "shard_files": [],
            "error_files": [], "image_bytes": 0}


def _merge_stats(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out = _empty_stats()
    counters = {k: Counter() for k in ("failures", "rows_by_task", "image_token_histogram")}
    for p in parts:
        if not p:
            continue
        for k in ("rows_out", "rows_failed", "tokens", "target_tokens", "shard_bytes", "error_bytes", "image_bytes"):
            out[k] += int(p.get(k, 0))
        for k in counters:
            counters[k].update(p.get(k, {}))
        out["shard_files"] += p.get("shard_files", [])
        out["error_files"] += p.get("error_files", [])
    for k, c in counters.items():
        out[k] = dict(sorted(c.items(), key=lambda kv: (len(kv[0]), kv[0])))
    out["shard_files"].sort()
    out["error_files"].sort()
    return out


class ShardDatasink(Datasink):
    """Splits processed rows: good ones into ``out/part-*.parquet`` (<= rows_per_file each),
    bad ones into ``out/errors/part-*.parquet``; returns per-task stats to the driver.

    File names derive from the write task's index, so a retried task overwrites its own
    files instead of duplicating rows.
    """

    def __init__(self, out: str, rows_per_file: int, compression: str, row_group_rows: int, s3fs_obj: Any = None,
                 rows_per_task: int | None = None):
        self.out = storage.normalize(out)
        self.rows_per_file = rows_per_file
        self.rows_per_task = rows_per_task or rows_per_file
        self.compression = compression
        self.row_group_rows = row_group_rows
        self.s3fs = s3fs_obj
        self.result: dict[str, Any] | None = None

    # Datasink API -------------------------------------------------------------------

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_task

    def get_name(self) -> str:
        return "ShardParquet"

    def _fs(self) -> tuple[Any, str]:
        if storage.is_remote(self.out):
            fs = self.s3fs if self.s3fs is not None else storage.s3_filesystem()
            return fs, self.out[len("s3://"):]
        import fsspec

        return fsspec.filesystem("file"), self.out

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        fs, root = self._fs()
        local = not storage.is_remote(self.out)
        if local:
            fs.makedirs(root, exist_ok=True)
        stats = _empty_stats()
        failures: Counter = Counter()
        by_task: Counter = Counter()
        hist: Counter = Counter()
        task_idx = int(getattr(ctx, "task_idx", 0))
        writer: pq.ParquetWriter | None = None
        handle = None
        file_rows = 0
        n_files = 0
        errors: list[pa.Table] = []

        def close() -> None:
            nonlocal writer, handle
            if writer is not None:
                writer.close()
                handle.close()
                writer, handle = None, None

        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            bad = pc.is_valid(table["_error_reason"])
            if pc.any(bad).as_py():
                errors.append(_errors_table(table.filter(bad)))
                table = table.filter(pc.invert(bad))
            table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
            if table.num_rows == 0:
                continue
            _tally(table, stats, by_task, hist)
            start = 0
            while start < table.num_rows:
                if writer is None:
                    name = f"{SHARD_GLOB_PREFIX}{task_idx:05d}-{n_files:04d}.parquet"
                    path = f"{root}/{name}"
                    handle = fs.open(path, "wb")
                    writer = pq.ParquetWriter(handle, SHARD_SCHEMA, compression=self.compression)
                    stats["shard_files"].append(storage.to_uri(fs, path))
                    n_files += 1
                    file_rows = 0
                take = min(self.rows_per_file - file_rows, table.num_rows - start)
                writer.write_table(table.slice(start, take), row_group_size=self.row_group_rows)
                file_rows += take
                start += take
                if file_rows >= self.rows_per_file:
                    close()
        close()
        if errors:
            err = pa.concat_tables(errors)
            for r in err.column("reason").to_pylist():
                failures[r] += 1
            if local:
                fs.makedirs(f"{root}/{ERRORS_DIR}", exist_ok=True)
            path = f"{root}/{ERRORS_DIR}/{SHARD_GLOB_PREFIX}{task_idx:05d}.parquet"
            with fs.open(path, "wb") as fh:
                pq.write_table(err, fh, compression=self.compression)
            stats["error_files"].append(storage.to_uri(fs, path))
            stats["rows_failed"] = err.num_rows
        for uri in stats["shard_files"]:
            stats["shard_bytes"] += fs.size(uri[len("s3://"):] if uri.startswith("s3://") else uri)
        for uri in stats["error_files"]:
            stats["error_bytes"] += fs.size(uri[len("s3://"):] if uri.startswith("s3://") else uri)
        stats["failures"] = dict(failures)
        stats["rows_by_task"] = dict(by_task)
        stats["image_token_histogram"] = {str(k): v for k, v in hist.items()}
        return stats

    def on_write_complete(self, write_result: Any) -> None:
        self.result = _merge_stats(write_result.write_returns)


def _errors_table(rows: pa.Table) -> pa.Table:
    return pa.table({"id": rows["id"], "reason": rows["_error_reason"], "message": rows["_error_message"],
                     "manifest": rows["_manifest"], "image": rows["_image"]}, schema=ERRORS_SCHEMA)


def _tally(table: pa.Table, stats: dict[str, Any], by_task: Counter, hist: Counter) -> None:
    stats["rows_out"] += table.num_rows
    stats["tokens"] += int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
    stats["target_tokens"] += int(pc.sum(pc.list_flatten(table["loss_mask"])).as_py() or 0)
    stats["image_bytes"] += int(pc.sum(pc.binary_length(table["global_view"])).as_py() or 0)
    stats["image_bytes"] += int(pc.sum(pc.binary_length(table["tiles"])).as_py() or 0)
    by_task.update(table["task"].to_pylist())
    vision = pc.is_valid(table["global_view"])
    hist.update(table["n_image_tokens"].filter(vision).to_pylist())


# ------------------------------------------------------------------------ the job


def _clear_outputs(out: str) -> int:
    """Remove a previous run's shards, errors and stats (only files this job writes)."""
    old = [f for f in storage.list_files(out, ".parquet") if Path(f).name.startswith(SHARD_GLOB_PREFIX)]
    old += storage.list_files(storage.join(out, ERRORS_DIR), ".parquet")
    old += [f for f in storage.list_files(out) if Path(f).name == STATS_FILE]
    return storage.remove(old)


def _get_tokenizer(cfg: PreprocessConfig, records: "ray.data.Dataset") -> tuple[Tokenizer, bool, int | None]:
    """(tokenizer, trained here?, number of records when training counted them)."""
    if cfg.tokenizer:
        uri = storage.normalize(cfg.tokenizer)
        if not storage.is_remote(uri) and Path(uri).is_dir():
            uri = str(Path(uri) / TOKENIZER_FILE)
        try:
            text = storage.read_text(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer {uri} does not exist") from None
        return Tokenizer.from_json(text), False, None
    counter = [0]
    tokenizer = Tokenizer.train(_iter_texts(records, counter), cfg.resolved_vocab_size())
    return tokenizer, True, counter[0]


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Run the whole job on the connected Ray cluster (``ray.init`` is the caller's business;
    a local one is started when none is connected). Raises PreprocessError when the failed
    fraction exceeds ``cfg.max_error_fraction``."""
    cfg.validate()
    if not ray.is_initialized():
        ray.init()
    t0 = time.perf_counter()
    out = storage.normalize(cfg.out)
    # S3 access is configured here, on the driver, and the filesystem object travels to the
    # workers (they need no AWS environment of their own); also when only images are in S3
    needs_s3 = storage.is_remote(out) or any(storage.is_remote(m) for m in cfg.manifests)
    s3fs_obj = _driver_s3fs(required=needs_s3)
    storage.makedirs(out)
    _clear_outputs(out)

    records = read_manifests(cfg.manifests, s3fs_obj)
    tokenizer, trained, n_records = _get_tokenizer(cfg, records)
    tokenizer_path = storage.join(out, TOKENIZER_FILE)
    storage.write_text(tokenizer_path, tokenizer.to_json())
    t_tok = time.perf_counter()

    if n_records is None:
        n_records = records.count()
    spec = _Spec(tokenizer.to_json(), cfg.mode, cfg.max_crops, cfg.max_pixels, cfg.resolved_max_seq_len(),
                 cfg.max_image_bytes, s3fs_obj)
    rows_per_task = _rows_per_task(n_records, cfg.rows_per_file)
    batch = min(cfg.batch_size, rows_per_task)  # blocks of a batch: the write bundles them per task
    processed = records.repartition(target_num_rows_per_block=batch).map_batches(
        process_batch, fn_kwargs={"spec": spec}, batch_size=batch, batch_format="pyarrow")
    sink = ShardDatasink(out, cfg.rows_per_file, cfg.compression, cfg.row_group_rows, s3fs_obj,
                         rows_per_task=rows_per_task)
    processed.write_datasink(sink)
    t_end = time.perf_counter()

    written = sink.result or _empty_stats()
    rows_in = written["rows_out"] + written["rows_failed"]
    seconds = t_end - t0
    n_images = sum(written["image_token_histogram"].values())
    stats = {
        "status": "ok",
        "manifests": [storage.normalize(m) for m in cfg.manifests],
        "out": out,
        "mode": cfg.mode,
        "preset": cfg.preset,
        "max_crops": ImageProcessor.from_mode(cfg.mode, max_crops=cfg.max_crops).config.max_crops,
        "max_seq_len": cfg.resolved_max_seq_len(),
        "rows_per_file": cfg.rows_per_file,
        "rows_in": rows_in,
        "rows_out": written["rows_out"],
        "rows_failed": written["rows_failed"],
        "failed_fraction": (written["rows_failed"] / rows_in) if rows_in else 0.0,
        "max_error_fraction": cfg.max_error_fraction,
        "failures": written["failures"],
        "rows_by_task": written["rows_by_task"],
        "image_token_histogram": written["image_token_histogram"],
        "tokens": written["tokens"],
        "target_tokens": written["target_tokens"],
        "bytes": {"shards": written["shard_bytes"], "errors": written["error_bytes"],
                  "image_raw": written["image_bytes"]},
        "files": {"shards": [_rel(out, f) for f in written["shard_files"]],
                  "errors": [_rel(out, f) for f in written["error_files"]]},
        "tokenizer": {"path": tokenizer_path, "vocab_size": tokenizer.vocab_size, "trained": trained},
        "seconds": {"total": round(seconds, 3), "tokenizer": round(t_tok - t0, 3),
                    "process_and_write": round(t_end - t_tok, 3)},
        "images_per_second": round(n_images / max(t_end - t_tok, 1e-9), 3),
    }
    problem = _failure_message(stats)
    if problem:
        stats["status"] = "failed"
        stats["error"] = problem
    stats_path = storage.join(out, STATS_FILE)
    storage.write_text(stats_path, json.dumps(stats, indent=2) + "\n")
    result = PreprocessResult(stats=stats, out=out, shard_files=written["shard_files"],
                              errors_path=storage.join(out, ERRORS_DIR) if written["error_files"] else None,
                              stats_path=stats_path, tokenizer_path=tokenizer_path)
    if problem:
        raise PreprocessError(problem, result)
    return result


def _driver_s3fs(required: bool) -> Any:
    """The s3fs object handed to the workers: when S3 paths are given, or when the environment
    configures S3 (a local manifest may still name s3:// images) and s3fs is installed."""
    if required:
        return storage.s3_filesystem()
    if storage.s3_configured():
        try:
            return storage.s3_filesystem()
        except storage.StorageError:  # no s3fs (e.g. the GPU bundle): local paths only
            return None
    return None


def _rows_per_task(n_records: int, rows_per_file: int) -> int:
    """Records per process-and-write task: rows_per_file, or fewer when the job is small so
    that every CPU of the cluster gets about two tasks (a small job still runs in parallel)."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(rows_per_file, math.ceil(n_records / (2 * cpus))))


def _rel(out: str, uri: str) -> str:
    prefix = out.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def _failure_message(stats: Mapping[str, Any]) -> str | None:
    rows_in, failed = stats["rows_in"], stats["rows_failed"]
    if rows_in == 0:
        return f"preprocess failed: the manifests {stats['manifests']} hold no records"
    if stats["failed_fraction"] > stats["max_error_fraction"]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats["failures"].items(), key=lambda kv: -kv[1]))
        return (f"preprocess failed: {failed} of {rows_in} records ({stats['failed_fraction']:.1%}) could not be "
                f"used, more than --max-error-fraction {stats['max_error_fraction']:g} allows "
                f"(reasons: {reasons}); see the errors table in {storage.join(stats['out'], ERRORS_DIR)}")
    return None


def format_summary(stats: Mapping[str, Any]) -> str:
    """A short human summary of a stats.json dict (printed by the job)."""
    lines = [
        f"preprocess {stats['status']}: {stats['rows_out']}/{stats['rows_in']} rows written to {stats['out']} "
        f"({len(stats['files']['shards'])} shard files, {stats['bytes']['shards'] / 1e6:.1f} MB) "
        f"in {stats['seconds']['total']:.1f} s",
        f"  mode {stats['mode']}, max_seq_len {stats['max_seq_len']}, tokenizer vocab "
        f"{stats['tokenizer']['vocab_size']} ({'trained' if stats['tokenizer']['trained'] else 'given'})",
        f"  rows by task: {stats['rows_by_task']}; tokens {stats['tokens']} (targets {stats['target_tokens']})",
        f"  image tokens per image: {stats['image_token_histogram']}; {stats['images_per_second']:.2f} images/s",
    ]
    if stats["rows_failed"]:
        lines.append(f"  failed {stats['rows_failed']} ({stats['failed_fraction']:.1%}): {stats['failures']} "
                     f"-> {storage.join(stats['out'], ERRORS_DIR)}")
    if stats.get("error"):
        lines.append(f"  {stats['error']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ reading back


def shard_files(path: str) -> list[str]:
    """The shard files of a preprocess output directory (not its errors/), or one file."""
    uri = storage.normalize(path)
    if uri.endswith(".parquet") and not storage.is_dir(uri):
        return [uri]
    files = [f for f in storage.list_files(uri, ".parquet") if Path(f).name.startswith(SHARD_GLOB_PREFIX)]
    if not files:
        raise FileNotFoundError(f"no shards ({SHARD_GLOB_PREFIX}*.parquet) in {uri}; run jobs/preprocess.py first")
    return files


def read_shards(path: str | Sequence[str]) -> "ray.data.Dataset":
    """A Ray dataset over the shard rows in a directory (local or s3://) or of given files."""
    files = [f for p in ([path] if isinstance(path, str) else path) for f in shard_files(p)]
    remote = [storage.is_remote(f) for f in files]
    if any(remote) and not all(remote):
        raise ValueError("read_shards: mix of local and s3:// shards; read them separately and union")
    if all(remote):
        return read_parquet_v1([f[len("s3://"):] for f in files], filesystem=storage.s3_filesystem())
    return read_parquet_v1(files)


def read_parquet_v1(paths: str | list[str], **kwargs: Any) -> "ray.data.Dataset":
    """``ray.data.read_parquet`` through Ray's V1 datasource.

    Why: Ray 2.60's default V2 path indexes Parquet footers with a pool of up to 32 new
    actors per read; on a small machine starting them costs 5-30 s for a handful of files
    (measured here: V2 15-30 s vs V1 0.5-2 s for the same 13-row read). The flag is read
    when the dataset is created, so it is switched only around this call.
    """
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = saved


def read_errors(out: str) -> pa.Table:
    """The errors table of a preprocess output (empty when nothing failed)."""
    files = storage.list_files(storage.join(out, ERRORS_DIR), ".parquet")
    if not files:
        return ERRORS_SCHEMA.empty_table()
    tables = []
    for f in files:
        fs, p = storage.filesystem(f)
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables).cast(ERRORS_SCHEMA)


def _as_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in np.asarray(value).reshape(-1).tolist()]


def decode_row(row: Mapping[str, Any], copy: bool = True) -> dict[str, Any]:
    """A shard row as numpy images + Python lists.

    Returns ``id, task, mode, input_ids, loss_mask (lists of int), n_image_tokens (int),
    spatial_crop ((cols, rows) or None), global_view (uint8 HxWx3 or None), tiles (uint8
    NxHxWx3, N may be 0, or None)``. Image arrays are writable copies, or with ``copy=False``
    read-only views of the row's bytes (for a caller that copies them anyway).
    """
    out: dict[str, Any] = {
        "id": row.get("id"), "task": row.get("task"), "mode": row.get("mode"),
        "input_ids": _as_list(row.get("input_ids")) or [],
        "loss_mask": _as_list(row.get("loss_mask")) or [],
        "n_image_tokens": int(row.get("n_image_tokens") or 0),
        "spatial_crop": None, "global_view": None, "tiles": None,
    }
    if row.get("global_view") is None:
        return out
    out["global_view"] = _array(row["global_view"], row.get("global_shape"), "global_view", copy)
    tiles = row.get("tiles")  # bytes, or a uint8 array over a block (pipeline.train.iter_shard_rows)
    out["tiles"] = _array(b"" if tiles is None else tiles, row.get("tiles_shape"), "tiles", copy)
    crop = _as_list(row.get("spatial_crop"))
    out["spatial_crop"] = (crop[0], crop[1]) if crop else (1, 1)
    return out


def _array(data: Any, shape: Any, name: str, copy: bool = True) -> np.ndarray:
    shape = _as_list(shape)
    if shape is None:
        raise ValueError(f"shard row has {name} bytes but no {name} shape")
    buf = np.frombuffer(bytearray(data) if copy else data, dtype=np.uint8)
    if buf.size != math.prod(shape):
        raise ValueError(f"{name}: {buf.size} bytes do not fill shape {shape}")
    return buf.reshape(shape)
