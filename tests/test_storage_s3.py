"""pipeline.storage on local paths and on a real S3 endpoint (moto's server on loopback),
and the preprocess job's full S3 round trip: manifest + images in S3 -> shards in S3 -> read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from free_ports import free_ports

BUCKET = "ndocr-test"


# ------------------------------------------------------------------ local paths (no server)


def test_local_paths_normalize_join_and_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("a/b") == str(tmp_path / "a" / "b")
    assert storage.normalize("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    assert storage.scheme("s3://b/k") == "s3" and not storage.is_remote("/tmp/x") and storage.is_remote("s3://b/k")
    assert storage.join("s3://b/dir/", "x", "y.json") == "s3://b/dir/x/y.json"
    assert storage.parent("s3://b/dir/m.jsonl") == "s3://b/dir" and storage.parent("/d/m.jsonl") == "/d"
    # manifest image paths: relative to the manifest dir (local or s3), absolute and URIs kept
    assert storage.resolve("images/p.png", "/data/set") == "/data/set/images/p.png"
    assert storage.resolve("../img/p.png", "s3://b/set/v1") == "s3://b/set/img/p.png"
    assert storage.resolve("/abs/p.png", "/data") == "/abs/p.png"
    assert storage.resolve("s3://other/p.png", "/data") == "s3://other/p.png"
    with pytest.raises(storage.StorageError, match="absolute local path"):
        storage.resolve("/abs/p.png", "s3://b/set")
    with pytest.raises(storage.StorageError, match="unsupported storage scheme"):
        storage.normalize("gs://bucket/x")


def test_local_file_helpers(tmp_path):
    path = storage.write_text(str(tmp_path / "deep" / "dir" / "a.json"), "{}")
    storage.write_bytes(str(tmp_path / "deep" / "dir" / "b.bin"), b"\x00" * 10)
    assert storage.read_text(path) == "{}" and storage.exists(path) and storage.size(path) == 2
    assert [Path(p).name for p in storage.list_files(str(tmp_path / "deep" / "dir"))] == ["a.json", "b.bin"]
    assert storage.list_files(str(tmp_path / "deep" / "dir"), ".bin") == [str(tmp_path / "deep" / "dir" / "b.bin")]
    assert storage.list_files(str(tmp_path / "absent")) == []
    with pytest.raises(ValueError, match="exceeds the limit"):
        storage.read_bytes(str(tmp_path / "deep" / "dir" / "b.bin"), max_bytes=4)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))
    assert storage.remove([path, str(tmp_path / "nope")]) == 1 and not storage.exists(path)


# ------------------------------------------------------------------ S3 (moto server on loopback)


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with test credentials in the environment and one bucket."""
    from moto.server import ThreadedMotoServer

    (port,) = free_ports()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


def test_s3_file_helpers_honour_aws_endpoint_url(s3_endpoint):
    fs = storage.s3_filesystem()
    assert fs.client_kwargs["endpoint_url"] == s3_endpoint == os.environ["AWS_ENDPOINT_URL"]
    base = f"s3://{BUCKET}/helpers"
    storage.write_text(storage.join(base, "a.json"), '{"x": 1}')
    storage.write_bytes(storage.join(base, "sub", "b.bin"), b"abc")
    assert json.loads(storage.read_text(f"{base}/a.json")) == {"x": 1}
    assert storage.exists(f"{base}/a.json") and not storage.exists(f"{base}/zzz")
    assert storage.list_files(base) == [f"{base}/a.json"]  # not recursive; fresh listing each time
    assert storage.list_files(base, recursive=True) == [f"{base}/a.json", f"{base}/sub/b.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/missing.png")
    assert storage.remove([f"{base}/a.json"]) == 1 and storage.list_files(base) == []


def test_preprocess_s3_round_trip(ray_local, s3_endpoint, tmp_path):
    """Manifest and images in S3 -> preprocess (Ray workers read S3) -> shards, errors,
    stats and tokenizer in S3 -> read back equal to local processing."""
    from model.processor import ImageProcessor
    from model.tokenizer import Tokenizer
    from pipeline.preprocess import PreprocessConfig, decode_row, read_errors, read_shards, run_preprocess
    from pipeline.synth import SynthConfig, generate

    local = tmp_path / "synth"
    manifest = generate(local, 2, SynthConfig.easy(), seed=5)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    fs = storage.s3_filesystem()
    src = f"{BUCKET}/data/v1"
    for name in sorted({r["image"] for r in records}):
        fs.put(str(local / name), f"{src}/{name}")
    # one record points at another prefix by s3:// URI, one at an image that is not there
    fs.put(str(local / records[0]["image"]), f"{BUCKET}/elsewhere/page.png")
    extra = [dict(records[0], id="by-uri", image=f"s3://{BUCKET}/elsewhere/page.png"),
             dict(records[0], id="gone", image="images/gone.png")]
    with fs.open(f"{src}/manifest.jsonl", "wb") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records + extra).encode())

    out = f"s3://{BUCKET}/shards/tiny"
    result = run_preprocess(PreprocessConfig(manifests=[f"s3://{src}/manifest.jsonl"], out=out, mode="tiny",
                                             vocab_size=400, rows_per_file=2, max_error_fraction=0.5))
    assert result.stats["rows_in"] == len(records) + 2 and result.rows_out == len(records) + 1
    assert all(f.startswith(out + "/part-") for f in result.shard_files)
    stats = json.loads(storage.read_text(f"{out}/stats.json"))
    assert stats["rows_out"] == len(records) + 1 and stats["failures"] == {"missing": 1}
    errors = read_errors(out).to_pylist()
    assert [(e["id"], e["reason"], e["image"]) for e in errors] == [("gone", "missing", f"s3://{src}/images/gone.png")]

    tok = Tokenizer.from_json(storage.read_text(f"{out}/tokenizer.json"))
    processor = ImageProcessor.from_mode("tiny")
    by_id = {r["id"]: r for r in records + extra[:1]}
    rows = read_shards(out).take_all()
    assert sorted(r["id"] for r in rows) == sorted(by_id)
    for row in rows:
        d = decode_row(row)
        rec = by_id[d["id"]]
        p = processor.process(local / records[0]["image"] if d["id"] == "by-uri" else local / rec["image"])
        assert np.array_equal(d["global_view"], p.global_view) and d["n_image_tokens"] == p.n_image_tokens == 73
        assert d["tiles"].shape[0] == 0 and d["spatial_crop"] == (1, 1)
        assert d["input_ids"] == tok.render_vision(rec["prompt"], rec["response"], p.n_image_tokens)[0]
