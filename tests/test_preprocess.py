"""Records schema, and the Ray Data preprocess job: synth -> shards -> read back, bad inputs, CLI."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from model.processor import ImageProcessor
from model.tokenizer import Tokenizer
from pipeline.records import ERROR_REASONS, RecordError, TextRecord, VisionRecord, parse_record, validate_record

REPO = Path(__file__).resolve().parents[1]
GOOD = {"id": "p1", "image": "images/p1.png", "prompt": "<image>\nFree OCR.", "response": "Hello", "task": "free"}


# ------------------------------------------------------------------ records


def test_vision_record_parses_and_keeps_extra_fields():
    rec = parse_record(dict(GOOD, split="train", boxes=[{"label": "text", "box": [1, 2, 3, 4]}]))
    assert isinstance(rec, VisionRecord) and rec.kind == "vision"
    assert (rec.id, rec.image, rec.prompt, rec.response, rec.task) == ("p1", "images/p1.png", GOOD["prompt"],
                                                                        "Hello", "free")
    assert rec.extra == {"split": "train", "boxes": [{"label": "text", "box": [1, 2, 3, 4]}]}
    assert parse_record(json.dumps(GOOD)) == rec  # a JSON line parses the same


def test_text_record_defaults_task_to_text():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rec = parse_record({"id": 7, "messages": chat})
    assert isinstance(rec, TextRecord) and rec.kind == "text"
    assert rec.id == "7" and rec.task == "text" and len(rec.messages) == 2


@pytest.mark.parametrize("record, reason, words", [
    ("{not json", "bad_record", "not valid JSON"),
    ("[1, 2]", "bad_record", "JSON object"),
    ({k: v for k, v in GOOD.items() if k != "id"}, "bad_record", "'id'"),
    ({k: v for k, v in GOOD.items() if k != "response"}, "bad_record", "'response'"),
    ({k: v for k, v in GOOD.items() if k != "task"}, "bad_record", "'task'"),
    (dict(GOOD, prompt="Free OCR."), "no_image_token", "<image>"),
    (dict(GOOD, prompt="<image><image>"), "bad_record", "2 <image>"),
    (dict(GOOD, response="see <image>"), "bad_record", "response contains"),
    (dict(GOOD, image=3), "bad_record", "'image' must be a string"),
    (dict(GOOD, task="text"), "bad_record", "reserved"),
    (dict(GOOD, messages=[]), "bad_record", "both"),
    ({"id": "x", "task": "free"}, "bad_record", "needs 'image'"),
    ({"id": "t", "messages": []}, "bad_record", "non-empty list"),
    ({"id": "t", "messages": [{"role": "robot", "content": "x"}]}, "bad_record", "role 'robot'"),
    ({"id": "t", "messages": [{"role": "user", "content": 5}]}, "bad_record", "content"),
])
def test_invalid_records_name_the_problem(record, reason, words):
    with pytest.raises(RecordError) as info:
        parse_record(record)
    assert info.value.reason == reason and reason in ERROR_REASONS
    assert words in str(info.value)
    assert validate_record(record) == [str(info.value)]


def test_record_error_keeps_the_id_when_known():
    with pytest.raises(RecordError) as info:
        parse_record(dict(GOOD, prompt="no placeholder"))
    assert info.value.record_id == "p1"
    assert validate_record(GOOD) == []


# ------------------------------------------------------------------ config and CLI parsing


def test_yaml_keys_mirror_flags_and_flags_override(tmp_path):
    sys.path.append(str(REPO / "jobs"))  # after the repo root: jobs/serve.py must not shadow serve/
    try:
        from jobs.preprocess import build_config
    finally:
        sys.path.remove(str(REPO / "jobs"))
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("manifest: [a.jsonl]\nout: o\nmode: gundam\nmax-crops: 6\nrows_per_file: 10\n"
                        "max-error-fraction: 0.5\naddress: auto\n")
    cfg, address = build_config(["--config", str(cfg_file), "--rows-per-file", "3",
                                 "--manifest", "b.jsonl", "c.parquet"])
    assert cfg.manifests == ["b.jsonl", "c.parquet"] and cfg.out == "o" and cfg.mode == "gundam"
    assert (cfg.max_crops, cfg.rows_per_file, cfg.max_error_fraction, address) == (6, 3, 0.5, "auto")
    cfg_file.write_text("manifest: a.jsonl\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        build_config(["--config", str(cfg_file)])


# ------------------------------------------------------------------ the job


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (never allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def synth_pages(tmp_path_factory):
    """Three A4-like pages wide enough for Gundam tiles (JSONL manifest), plus text records
    (a Parquet manifest), in one folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.synth import SynthConfig, generate, text_records

    root = tmp_path_factory.mktemp("synth")
    manifest = generate(root, 3, SynthConfig.document(width_range=(700, 800)), seed=3)
    text = root / "text.parquet"
    pq.write_table(pa.Table.from_pylist(text_records(4, seed=1)), text)
    return manifest, text


def test_synth_to_shards_round_trip_equals_processor(ray_local, synth_pages, tmp_path):
    from pipeline.preprocess import PreprocessConfig, decode_row, read_errors, read_shards, run_preprocess
    from pipeline.synth import read_manifest

    manifest, text = synth_pages
    out = tmp_path / "shards"
    cfg = PreprocessConfig(manifests=[str(manifest), str(text)], out=str(out), mode="gundam", vocab_size=600,
                           max_seq_len=4096, rows_per_file=2)
    result = run_preprocess(cfg)

    vision = {r["id"]: r for r in read_manifest(manifest)}
    import pyarrow.parquet as pq

    texts = {r["id"]: r for r in pq.read_table(text).to_pylist()}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == stats["rows_out"] == len(vision) + len(texts) == 10
    assert stats["rows_failed"] == 0 and stats["failures"] == {} and read_errors(str(out)).num_rows == 0
    assert stats["rows_by_task"] == {"markdown": 3, "free": 3, "text": 4}
    assert sum(stats["image_token_histogram"].values()) == 6 and stats["bytes"]["shards"] > 0
    assert stats["tokenizer"]["trained"] and stats["seconds"]["total"] > 0
    assert len(result.shard_files) == len(stats["files"]["shards"]) >= 5  # at most 2 rows per file
    assert all(pq.ParquetFile(f).metadata.num_rows <= 2 for f in result.shard_files)

    tok = Tokenizer.load(out / "tokenizer.json")  # saved beside the shards
    assert tok.vocab_size == stats["tokenizer"]["vocab_size"] <= 600
    processor = ImageProcessor.from_mode("gundam")
    rows = read_shards(str(out)).take_all()
    assert sorted(r["id"] for r in rows) == sorted([*vision, *texts])
    n_tiled = 0
    for row in rows:
        d = decode_row(row)
        if d["task"] == "text":
            ids, mask = tok.render_conversation(texts[d["id"]]["messages"])
            assert d["global_view"] is None and d["tiles"] is None and d["n_image_tokens"] == 0
        else:
            rec = vision[d["id"]]
            p = processor.process(rec["image"])
            assert d["global_view"].dtype == np.uint8 and np.array_equal(d["global_view"], p.global_view)
            assert d["tiles"].shape == p.tiles.shape and np.array_equal(d["tiles"], p.tiles)
            assert d["spatial_crop"] == tuple(p.spatial_crop) and d["n_image_tokens"] == p.n_image_tokens
            assert d["mode"] == "gundam"
            ids, mask = tok.render_vision(rec["prompt"], rec["response"], p.n_image_tokens)
            n_tiled += p.tiles.shape[0] > 0
        assert d["input_ids"] == ids and d["loss_mask"] == mask
    assert n_tiled == 6  # the pages are wider than 640 px: tiles were produced and survived


@pytest.fixture(scope="module")
def bad_manifest(synth_pages, tmp_path_factory):
    """Two good records and one of each kind of bad input; returns (manifest, expected reasons)."""
    good_manifest, _ = synth_pages
    good_image = str(good_manifest.parent / json.loads(good_manifest.read_text().splitlines()[0])["image"])
    root = tmp_path_factory.mktemp("bad")
    (root / "img").mkdir()
    png = Path(good_image).read_bytes()
    (root / "img" / "truncated.png").write_bytes(png[: len(png) * 6 // 10])
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "random.png").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "img" / "bomb.png").write_bytes(_png_bomb())
    shutil.copy(good_image, root / "img" / "good.png")

    def vision(rid, image, prompt="<image>\nFree OCR.", response="short text"):
        return {"id": rid, "image": image, "prompt": prompt, "response": response, "task": "free"}

    records = [
        vision("good-relative", "img/good.png"),
        vision("good-absolute", good_image),  # absolute paths are used as they are
        vision("truncated", "img/truncated.png"),
        vision("empty", "img/empty.png"),
        vision("random", "img/random.png"),
        vision("missing", "img/nope.png"),
        vision("bomb", "img/bomb.png"),
        vision("no-image-token", "img/good.png", prompt="Free OCR."),
        vision("too-long", "img/good.png", response="lorem ipsum dolor " * 400),
        {"id": "no-response", "image": "img/good.png", "prompt": "<image>", "task": "free"},
    ]
    lines = [json.dumps(r) for r in records] + ["{this is not json"]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    expected = {"truncated": "truncated", "empty": "empty", "random": "unreadable", "missing": "missing",
                "bomb": "too_large", "no-image-token": "no_image_token", "too-long": "too_long",
                "no-response": "bad_record", None: "bad_record"}
    return manifest, expected


def test_bad_inputs_land_in_the_errors_table(ray_local, bad_manifest, tmp_path):
    from pipeline.preprocess import PreprocessConfig, read_errors, read_shards, run_preprocess

    manifest, expected = bad_manifest
    out = tmp_path / "out"
    result = run_preprocess(PreprocessConfig(manifests=[str(manifest)], out=str(out), mode="tiny",
                                             max_seq_len=512, max_error_fraction=1.0))
    errors = read_errors(str(out)).to_pylist()
    assert {e["id"]: e["reason"] for e in errors} == expected
    assert len(errors) == len(expected)  # one row per bad record
    by_id = {e["id"]: e for e in errors}
    assert by_id["missing"]["image"].endswith("img/nope.png") and "no such image" in by_id["missing"]["message"]
    assert "512" in by_id["too-long"]["message"] and "exceeds" in by_id["bomb"]["message"]
    assert all(e["manifest"] == str(manifest) and e["message"] for e in errors)
    assert sorted(r["id"] for r in read_shards(str(out)).take_all()) == ["good-absolute", "good-relative"]
    stats = result.stats
    assert (stats["rows_in"], stats["rows_out"], stats["rows_failed"]) == (11, 2, 9)
    assert stats["failures"]["bad_record"] == 2 and sum(stats["failures"].values()) == 9
    assert stats["status"] == "ok" and result.errors_path == str(out / "errors")


def test_job_fails_clearly_above_max_error_fraction(ray_local, bad_manifest, tmp_path, capsys):
    sys.path.append(str(REPO / "jobs"))  # after the repo root: jobs/serve.py must not shadow serve/
    try:
        from jobs.preprocess import main
    finally:
        sys.path.remove(str(REPO / "jobs"))
    manifest, _ = bad_manifest
    out = tmp_path / "out"
    code = main(["--manifest", str(manifest), "--out", str(out), "--mode", "tiny", "--max-seq-len", "512",
                 "--max-error-fraction", "0.1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "9 of 11 records (81.8%)" in err and "--max-error-fraction 0.1" in err and "errors" in err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "failed" and stats["failed_fraction"] > 0.1
    assert main(["--out", str(out)]) == 2 and "no manifest given" in capsys.readouterr().err


def test_shard_rows_table_keeps_views_bytes_and_nulls_exactly():
    """rows_to_table builds the view columns in one buffer (pipeline.preprocess._large_binary): the
    same Arrow column as pa.array, text rows' nulls and empty tile blobs included."""
    import pyarrow as pa

    from pipeline.preprocess import SHARD_SCHEMA, rows_to_table, shard_row

    rng = np.random.default_rng(0)
    view = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    tiles = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    rows = [shard_row("a", "free", [1, 2, 3], [0, 1, 1], mode="tiny", global_view=view, tiles=tiles,
                      spatial_crop=[2, 1], n_image_tokens=12),
            shard_row("t", "text", [4, 5], [1, 1]),  # a text row: no views
            shard_row("b", "line", [6], [1], mode="tiny", global_view=view[:8], tiles=tiles[:0],
                      spatial_crop=[1, 1], n_image_tokens=4)]
    table = rows_to_table(rows)
    table.validate(full=True)
    assert table.schema == SHARD_SCHEMA
    for name in ("global_view", "tiles"):
        assert table.column(name).combine_chunks().equals(pa.array([r[name] for r in rows], pa.large_binary()))
    assert table.column("global_view").null_count == 1 and table.column("tiles")[2].as_py() == b""
    assert np.array_equal(np.frombuffer(table.column("global_view")[0].as_py(), np.uint8).reshape(view.shape), view)
    assert rows_to_table([]).num_rows == 0


def test_trainer_reads_shard_rows_as_iter_rows_does_without_copying_views(ray_local):
    """pipeline.train.iter_shard_rows: the same rows as Ray's iter_rows (views, text rows' nulls, the
    glyphs column, several blocks), with the views as arrays over the blocks instead of bytes copies."""
    import pyarrow as pa
    import ray

    from pipeline.preprocess import decode_row, rows_to_table, shard_row
    from pipeline.train import iter_shard_rows

    rng = np.random.default_rng(1)
    rows = []
    for i in range(5):
        if i == 2:
            rows.append(shard_row("text", "text", [1, 2], [1, 1]))
        else:
            view = rng.integers(0, 256, (8 + i, 12, 3), dtype=np.uint8)
            tiles = rng.integers(0, 256, (i % 2, 4, 4, 3), dtype=np.uint8)
            rows.append(shard_row(f"v{i}", "line", [3] * (i + 1), [1] * (i + 1), mode="tiny", global_view=view,
                                  tiles=tiles, spatial_crop=[1, 1], n_image_tokens=2))
    table = rows_to_table(rows).append_column("glyphs", pa.array([bytes([i]) * 16 for i in range(5)], pa.binary()))
    dataset = ray.data.from_arrow([table.slice(0, 2), table.slice(2)])  # two blocks, the second with an offset
    ours = list(iter_shard_rows(dataset.iterator()))
    theirs = list(dataset.iter_rows())
    assert len(ours) == len(theirs) == 5
    for mine, ray_row in zip(ours, theirs):
        assert mine["glyphs"] == ray_row["glyphs"]
        if ray_row["global_view"] is None:
            assert mine["global_view"] is None and mine["tiles"] is None
            continue
        assert isinstance(mine["global_view"], np.ndarray) and not mine["global_view"].flags.owndata
        a, b = decode_row(mine, copy=False), decode_row(ray_row)
        assert a["id"] == b["id"] and a["input_ids"] == b["input_ids"] and a["spatial_crop"] == b["spatial_crop"]
        assert np.array_equal(a["global_view"], b["global_view"]) and np.array_equal(a["tiles"], b["tiles"])
