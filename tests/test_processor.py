"""Image processor: DeepSeek-OCR's slot table, views, tiles, EXIF, errors, normalisation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from model.config import processor_config
from model.processor import (
    PAD_COLOR,
    ImageError,
    ImageProcessor,
    normalize,
    read_size,
    select_grid,
    to_tensors,
    token_report,
)

GUNDAM = ImageProcessor.from_mode("gundam")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


# --- the reference slot table ---------------------------------------------------------


@pytest.mark.parametrize(
    "size, crop, tokens",
    [
        ((1280, 1280), (2, 2), 693),
        ((1191, 1684), (2, 3), 903),  # A4 page
        ((3000, 1000), (3, 1), 583),
        ((1000, 3000), (1, 3), 603),
        ((640, 640), (1, 1), 273),  # not larger than a tile: global view only
        ((641, 300), (2, 1), 483),  # one side over 640 is enough to tile
    ],
)
def test_gundam_reference_table(size, crop, tokens):
    assert GUNDAM.count_tokens(*size) == (tokens, crop)


@pytest.mark.parametrize("mode, tokens", [("tiny", 73), ("small", 111), ("base", 273), ("large", 421)])
def test_native_modes_never_tile(mode, tokens):
    proc = ImageProcessor.from_mode(mode)
    for size in [(100, 100), (3000, 1000), (800, 2400)]:
        assert proc.count_tokens(*size) == (tokens, (1, 1))


def test_exact_tie_takes_larger_grid_only_for_large_images():
    # a square image ties (2,2) and (3,3); the larger grid needs W*H > 0.5*640^2*9
    assert select_grid(1280, 1280, 640, 2, 9) == (2, 2)
    assert select_grid(1400, 1400, 640, 2, 9) == (3, 3)


def test_max_crops_six_changes_the_choice():
    six = ImageProcessor.from_mode("gundam", max_crops=6)
    assert GUNDAM.count_tokens(2000, 2000) == (273 + 30 * 31, (3, 3))
    assert six.count_tokens(2000, 2000) == (693, (2, 2))
    assert GUNDAM.count_tokens(8000, 1000)[1] == (8, 1)
    assert six.count_tokens(8000, 1000)[1] == (6, 1)
    # where the best grid fits in 6 crops both agree
    assert six.count_tokens(1191, 1684) == GUNDAM.count_tokens(1191, 1684)


# --- pixels ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(641, 300), (1191, 1684), (500, 400), (1400, 1400)])
def test_process_matches_count_tokens(size):
    out = GUNDAM.process(noise(*size))
    n, crop = GUNDAM.count_tokens(*size)
    assert out.n_image_tokens == n and out.spatial_crop == crop
    assert out.global_view.shape == (1024, 1024, 3) and out.global_view.dtype == np.uint8
    n_tiles = crop[0] * crop[1] if crop != (1, 1) else 0
    assert out.tiles.shape == (n_tiles, 640, 640, 3) and out.tiles.dtype == np.uint8
    assert out.orig_size == size and out.mode == "gundam" and out.n_views == 1 + n_tiles


@pytest.mark.parametrize("mode, base", [("tiny", 512), ("small", 640), ("base", 1024), ("large", 1280)])
def test_native_mode_views(mode, base):
    out = ImageProcessor.from_mode(mode).process(noise(300, 200))
    assert out.global_view.shape == (base, base, 3)
    assert out.tiles.shape == (0, base, base, 3)
    assert out.spatial_crop == (1, 1) and out.mode == mode


def test_tiles_are_row_major_crops_of_the_stretched_image():
    img = noise(1400, 700, seed=1)  # 2x1 grid
    out = GUNDAM.process(img)
    assert out.spatial_crop == (2, 1)
    stretched = img.resize((1280, 640), Image.Resampling.BICUBIC)
    assert np.array_equal(out.tiles[0], np.array(stretched.crop((0, 0, 640, 640))))
    assert np.array_equal(out.tiles[1], np.array(stretched.crop((640, 0, 1280, 640))))
    assert not np.array_equal(out.tiles[0], out.tiles[1])

    tall = noise(700, 1300, seed=2)  # 1x2 grid: rows go down
    out = GUNDAM.process(tall)
    assert out.spatial_crop == (1, 2)
    stretched = tall.resize((640, 1280), Image.Resampling.BICUBIC)
    assert np.array_equal(out.tiles[1], np.array(stretched.crop((0, 640, 640, 1280))))

    grid = noise(1920, 1300, seed=3)  # 3x2: index = row * cols + col
    out = GUNDAM.process(grid)
    assert out.spatial_crop == (3, 2)
    stretched = grid.resize((1920, 1280), Image.Resampling.BICUBIC)
    assert np.array_equal(out.tiles[4], np.array(stretched.crop((640, 640, 1280, 1280))))


def test_global_view_is_padded_gray_and_matches_pil():
    img = noise(1600, 800, seed=4)
    out = GUNDAM.process(img)
    expected = ImageOps.pad(img, (1024, 1024), method=Image.Resampling.BICUBIC, color=PAD_COLOR)
    assert np.array_equal(out.global_view, np.array(expected))
    # content is 1024x512, centred: 256 rows of pad above and below
    assert (out.global_view[:250] == 127).all() and (out.global_view[-250:] == 127).all()
    assert not (out.global_view[300:700] == 127).all()


def test_small_image_is_upscaled_in_pad_modes_and_stretched_in_tiny():
    white = Image.new("RGB", (200, 100), (255, 255, 255))
    base = ImageProcessor.from_mode("base").process(white).global_view
    assert tuple(base[0, 0]) == PAD_COLOR and tuple(base[-1, -1]) == PAD_COLOR
    assert (base[300:700, 10:1014] == 255).all()  # upscaled content fills the width
    tiny = ImageProcessor.from_mode("tiny").process(white).global_view
    assert tiny.shape == (512, 512, 3) and (tiny == 255).all()  # stretched, no pad


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (1300, 650), (255, 0, 0))
    img.paste((0, 0, 255), (650, 0, 1300, 650))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = png_bytes(img, exif=exif)

    out = GUNDAM.process(data)
    assert out.orig_size == (650, 1300)
    assert out.spatial_crop == (1, 2)  # the tall grid, not (2, 1)
    upright = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert upright.shape == (1300, 650, 3)
    assert tuple(upright[10, 300]) == (255, 0, 0) and tuple(upright[-10, 300]) == (0, 0, 255)
    assert tuple(out.tiles[0][5, 320]) == (255, 0, 0) and tuple(out.tiles[1][-5, 320]) == (0, 0, 255)
    assert read_size(data) == (650, 1300)  # header-only path agrees


def test_modes_convert_to_rgb():
    gray = Image.new("L", (50, 40), 200)
    rgba = Image.new("RGBA", (50, 40), (10, 20, 30, 0))
    for img in (gray, rgba):
        out = ImageProcessor.from_mode("tiny").process(img)
        assert out.global_view.shape == (512, 512, 3)
    assert tuple(ImageProcessor.from_mode("tiny").process(gray).global_view[5, 5]) == (200, 200, 200)


# --- token report ---------------------------------------------------------------------


def test_token_report_size_and_path(tmp_path):
    assert token_report("1191x1684") == {"mode": "gundam", "crop": [2, 3], "image_tokens": 903, "views": 7}
    assert token_report("640x640") == {"mode": "gundam", "crop": [1, 1], "image_tokens": 273, "views": 1}
    assert token_report("2000X2000", max_crops=6)["crop"] == [2, 2]
    assert token_report("3000x1000", mode="large") == {"mode": "large", "crop": [1, 1], "image_tokens": 421, "views": 1}
    path = tmp_path / "page.png"
    noise(641, 300).save(path)
    assert token_report(str(path)) == {"mode": "gundam", "crop": [2, 1], "image_tokens": 483, "views": 3}
    with pytest.raises(ImageError) as info:
        token_report(str(tmp_path / "missing.png"))
    assert info.value.reason == "unreadable"
    with pytest.raises(ValueError, match="unknown mode"):
        token_report("100x100", mode="huge")


# --- errors ---------------------------------------------------------------------------


def reason_of(source, proc: ImageProcessor = GUNDAM) -> str:
    with pytest.raises(ImageError) as info:
        proc.process(source)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def png_with_header_size(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims another size (CRC fixed): only the header is big."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_error_empty(tmp_path):
    assert reason_of(b"") == "empty"
    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    assert reason_of(path) == "empty"


def test_error_unreadable(tmp_path):
    assert reason_of(b"this is not an image at all") == "unreadable"
    assert reason_of(tmp_path / "missing.jpg") == "unreadable"
    with pytest.raises(TypeError):
        GUNDAM.process(12345)


def test_error_truncated():
    img = noise(300, 200)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        data = buf.getvalue()
        assert reason_of(data[: len(data) // 2]) == "truncated"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # no global switch flipped


def test_error_too_large_checked_from_header():
    # 8000x8000 = 64M pixels > max_pixels (50M): refused before any pixel is decoded
    # (decoding this file would fail as truncated instead)
    assert reason_of(png_with_header_size(8000, 8000)) == "too_large"
    # far beyond PIL's own bomb limit: Image.open raises, still reported as too_large
    assert reason_of(png_with_header_size(100_000, 100_000)) == "too_large"
    small_limit = ImageProcessor(processor_config("gundam", max_pixels=10_000))
    assert reason_of(noise(200, 200), small_limit) == "too_large"
    assert small_limit.process(noise(100, 100)).n_image_tokens == 273


def test_error_too_small():
    assert reason_of(noise(7, 100)) == "too_small"
    assert reason_of(png_bytes(noise(100, 5))) == "too_small"
    assert GUNDAM.process(noise(8, 8)).global_view.shape == (1024, 1024, 3)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        ImageProcessor(processor_config("gundam", base_size=1000))
    with pytest.raises(ValueError, match="min_crops"):
        ImageProcessor(processor_config("gundam", min_crops=5, max_crops=4))
    with pytest.raises(ValueError):
        GUNDAM.count_tokens(0, 100)


# --- normalisation --------------------------------------------------------------------


def test_normalize_values_and_layouts():
    px = np.array([[[[0, 127, 255]] * 4] * 5], dtype=np.uint8)  # NHWC [1, 5, 4, 3]
    out = normalize(torch.from_numpy(px))
    assert out.shape == (1, 3, 5, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
    nchw = torch.from_numpy(px).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(normalize(nchw), out)
    assert torch.equal(normalize(px[0]), out)  # single HWC image gains the batch axis
    assert normalize(px, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="ambiguous"):
        normalize(torch.zeros(1, 3, 8, 3, dtype=torch.uint8))
    assert normalize(torch.zeros(1, 3, 8, 3, dtype=torch.uint8), layout="NCHW").shape == (1, 3, 8, 3)
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 3, 4, 4))


def test_to_tensors_shapes_and_pad_is_zero():
    out = GUNDAM.process(noise(1400, 700))
    glob, tiles = to_tensors(out)
    assert glob.shape == (1, 3, 1024, 1024) and tiles.shape == (2, 3, 640, 640)
    assert abs(glob[0, :, 0, 0]).max() < 0.01  # gray pad ~ mean
    assert torch.equal(tiles[1], normalize(out.tiles[1:2])[0])
    empty = to_tensors(GUNDAM.process(noise(100, 100)))[1]
    assert empty.shape == (0, 3, 640, 640)
