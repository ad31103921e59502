"""Image → views + vision-slot count, following DeepSeek-OCR's resolution modes.

An image becomes one *global view* (base_size x base_size) and, in crop ("Gundam") mode,
a grid of *tiles* (image_size x image_size each). The number of ``<image>`` slots the
prompt must reserve follows from the view sizes alone, so :meth:`ImageProcessor.count_tokens`
answers it from (width, height) without touching pixels.

Outputs stay ``uint8`` (what the shards store); :func:`normalize` / :func:`to_tensors` turn
them into mean = std = 0.5 float tensors later, on whatever device runs the encoder.

Reference behaviour reproduced here (DeepSeek-OCR):

- global view: ``ImageOps.pad`` to (base, base), bicubic, centred, on gray (127,127,127)
  (it upscales small images too); Tiny/Small (base <= 640, no crop) use a plain stretch;
- tiles only when crop_mode and (W > image_size or H > image_size); the grid (cols, rows)
  is the candidate with min_crops <= cols*rows <= max_crops whose cols/rows is closest to
  W/H, scanning by cols*rows and, on an exact tie, moving to the later grid only when
  W*H > 0.5 * image_size^2 * cols * rows; tiles are row-major crops of the image stretched
  to (image_size*cols, image_size*rows);
- slots: global g*(g+1)+1 with g = base/64; tiles add (q*rows)*(q*cols+1), q = image/64.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.config import MODES, ProcessorConfig, processor_config

if TYPE_CHECKING:  # torch is only needed for normalisation; keep the import lazy
    import torch

ImageSource = Union[Image.Image, bytes, bytearray, memoryview, str, os.PathLike]

PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): the normalisation mean, i.e. 0 after normalize()
STRETCH_MAX = 640  # non-crop modes up to this size stretch instead of padding (Tiny, Small)
MIN_SIDE = 8  # smaller images carry no readable content and break the resamplers' assumptions
_EXIF_ORIENTATION = 0x0112
_BICUBIC = Image.Resampling.BICUBIC


class ImageError(ValueError):
    """An input that cannot become views; ``reason`` is a short code for error tables.

    Reasons: ``unreadable`` (missing file, not an image, corrupt header), ``empty`` (zero
    bytes), ``too_large`` (more pixels than ``max_pixels``), ``too_small`` (a side < 8 px),
    ``truncated`` (pixel data ends early or is corrupt).
    """

    REASONS = ("unreadable", "empty", "too_large", "too_small", "truncated")

    def __init__(self, reason: str, message: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class ProcessedImage:
    """The views of one image, uint8 HWC, plus the slot count the prompt must reserve."""

    global_view: np.ndarray  # uint8 [base, base, 3]
    tiles: np.ndarray  # uint8 [N, tile, tile, 3], N = cols*rows or 0
    spatial_crop: tuple[int, int]  # (cols, rows); (1, 1) when there are no tiles
    n_image_tokens: int
    mode: str
    orig_size: tuple[int, int]  # (W, H) after EXIF transpose

    @property
    def n_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def n_views(self) -> int:
        return 1 + self.n_tiles


# ---------------------------------------------------------------------------------------
# grid selection and slot counting (pure arithmetic)


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_crops <= cols*rows <= max_crops, ordered by cols*rows.

    Grids of equal area keep the reference's order (a Python set filled by growing n, then
    cols, then rows), so that exact ties resolve identically.
    """
    seen: set[tuple[int, int]] = set()
    for n in range(min_crops, max_crops + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_crops <= cols * rows <= max_crops:
                    seen.add((cols, rows))
    return sorted(seen, key=lambda g: g[0] * g[1])


def select_grid(width: int, height: int, image_size: int, min_crops: int, max_crops: int) -> tuple[int, int]:
    """The tile grid (cols, rows) whose aspect ratio is closest to width/height."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_crops, max_crops):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)  # a large image earns the bigger grid on an exact tie
    return best


def global_slots(config: ProcessorConfig) -> int:
    """Slots of the global view: g rows of (g + newline), then the view separator."""
    g = config.global_grid
    return g * (g + 1) + 1


def tile_slots(config: ProcessorConfig, cols: int, rows: int) -> int:
    """Slots of a tile grid stitched into one map: q*rows rows of (q*cols + newline)."""
    q = config.tile_grid
    return (q * rows) * (q * cols + 1)


def _has_tiles(config: ProcessorConfig, width: int, height: int) -> bool:
    return config.crop_mode and (width > config.image_size or height > config.image_size)


def _layout(config: ProcessorConfig, width: int, height: int) -> tuple[int, tuple[int, int]]:
    """(n_image_tokens, (cols, rows)); a 1x1 grid (only possible with min_crops=1) means no tiles."""
    n = global_slots(config)
    if not _has_tiles(config, width, height):
        return n, (1, 1)
    cols, rows = select_grid(width, height, config.image_size, config.min_crops, config.max_crops)
    if (cols, rows) == (1, 1):
        return n, (1, 1)
    return n + tile_slots(config, cols, rows), (cols, rows)


# ---------------------------------------------------------------------------------------
# loading with clear errors


def _open(source: ImageSource) -> Image.Image:
    """Open lazily (header only). Pixel data is decoded later by ``_decode``."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "image bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError("unreadable", f"no such image file: {path}")
        data = path.read_bytes()
        where = str(path)
    else:
        raise TypeError(f"expected a PIL image, bytes or a path, got {type(source).__name__}")
    if not data:
        raise ImageError("empty", f"{where}: empty input (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"{where}: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncated" in str(exc).lower():  # the header itself is cut short
            raise ImageError("truncated", f"{where}: image data is truncated ({exc})") from exc
        raise ImageError("unreadable", f"{where}: not a readable image ({exc})") from exc


def _check_size(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError("too_small", f"{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE} pixels")


def _decode(img: Image.Image) -> Image.Image:
    """Force a full decode (so truncation surfaces here), apply EXIF orientation, make RGB."""
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from exc
    except (OSError, EOFError) as exc:
        raise ImageError("truncated", f"image data is truncated or corrupt ({exc})") from exc
    except (SyntaxError, ValueError) as exc:
        raise ImageError("unreadable", f"image data cannot be decoded ({exc})") from exc
    img = ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = ProcessorConfig.max_pixels) -> Image.Image:
    """A fully decoded, EXIF-transposed RGB image, or an :class:`ImageError`."""
    img = _open(source)
    _check_size(img, max_pixels)
    return _decode(img)


def read_size(source: ImageSource, max_pixels: int = ProcessorConfig.max_pixels) -> tuple[int, int]:
    """(W, H) as the model sees it (after EXIF transpose), read from the header only."""
    img = _open(source)
    _check_size(img, max_pixels)
    width, height = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not change the size; decode will judge the rest
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# ---------------------------------------------------------------------------------------
# the processor


def _mode_name(config: ProcessorConfig) -> str:
    for name, values in MODES.items():
        if all(getattr(config, k) == v for k, v in values.items()):
            return name
    return "custom"


class ImageProcessor:
    """Turns an image into uint8 views and the number of vision slots it needs."""

    def __init__(self, config: ProcessorConfig | None = None, mode: str | None = None):
        config = config if config is not None else processor_config("gundam")
        unit = config.patch_size * config.downsample
        for name in ("base_size", "image_size"):
            size = getattr(config, name)
            if size <= 0 or size % unit:
                raise ValueError(f"{name}={size} must be a positive multiple of patch_size*downsample={unit}")
        if not 1 <= config.min_crops <= config.max_crops:
            raise ValueError(f"need 1 <= min_crops <= max_crops, got {config.min_crops}, {config.max_crops}")
        if config.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {config.max_pixels}")
        self.config = config
        self.mode = mode if mode is not None else _mode_name(config)

    @classmethod
    def from_mode(cls, mode: str = "gundam", **overrides: Any) -> "ImageProcessor":
        """A processor for a named mode (tiny/small/base/large/gundam) with overrides."""
        return cls(processor_config(mode, **overrides), mode=mode)

    def count_tokens(self, width: int, height: int) -> tuple[int, tuple[int, int]]:
        """(n_image_tokens, (cols, rows)) for an image of this size, without pixels."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        return _layout(self.config, width, height)

    def global_view(self, img: Image.Image) -> Image.Image:
        cfg = self.config
        size = (cfg.base_size, cfg.base_size)
        if not cfg.crop_mode and cfg.base_size <= STRETCH_MAX:
            return img.resize(size, _BICUBIC)
        return ImageOps.pad(img, size, method=_BICUBIC, color=PAD_COLOR, centering=(0.5, 0.5))

    def tiles(self, img: Image.Image, cols: int, rows: int) -> list[Image.Image]:
        """Row-major crops of the image stretched to (tile*cols, tile*rows)."""
        t = self.config.image_size
        stretched = img.resize((t * cols, t * rows), _BICUBIC)
        return [stretched.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]

    def process(self, image: ImageSource) -> ProcessedImage:
        """Load (EXIF transpose, RGB), build the global view and tiles, count the slots."""
        img = load_image(image, self.config.max_pixels)
        width, height = img.size
        n_tokens, (cols, rows) = self.count_tokens(width, height)
        t = self.config.image_size
        if n_tokens > global_slots(self.config):
            tiles = np.stack([np.array(tile, dtype=np.uint8) for tile in self.tiles(img, cols, rows)])
        else:
            tiles = np.zeros((0, t, t, 3), dtype=np.uint8)
        return ProcessedImage(
            global_view=np.array(self.global_view(img), dtype=np.uint8),
            tiles=tiles,
            spatial_crop=(cols, rows),
            n_image_tokens=n_tokens,
            mode=self.mode,
            orig_size=(width, height),
        )

    def token_report(self, image_or_size: str | os.PathLike | bytes | Image.Image) -> dict[str, Any]:
        """``{"mode", "crop": [cols, rows], "image_tokens", "views"}`` for a path, image or "WxH"."""
        size = _parse_size(image_or_size) if isinstance(image_or_size, str) else None
        if size is None:
            size = read_size(image_or_size, self.config.max_pixels)
        n_tokens, (cols, rows) = self.count_tokens(*size)
        n_tiles = cols * rows if n_tokens > global_slots(self.config) else 0
        return {"mode": self.mode, "crop": [cols, rows], "image_tokens": n_tokens, "views": 1 + n_tiles}


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def _parse_size(spec: str) -> tuple[int, int] | None:
    """(W, H) from "WxH", or None when spec names an existing file or is not a size."""
    match = _SIZE_RE.match(spec)
    if match is None or Path(spec).is_file():
        return None
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {spec!r}")
    return width, height


def token_report(spec: str, mode: str = "gundam", max_crops: int = 9) -> dict[str, Any]:
    """Slot budget of an image path or a "WxH" size in a mode (used by ``ndocr tokens``)."""
    return ImageProcessor.from_mode(mode, max_crops=max_crops).token_report(spec)


# ---------------------------------------------------------------------------------------
# normalisation (on the device, after transfer as uint8)


def normalize(pixels: "torch.Tensor | np.ndarray", layout: str = "auto", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """uint8 NHWC/NCHW (or a single HWC/CHW image) → float NCHW with mean = std = 0.5.

    ``layout="auto"`` reads the channel axis from the shape (3 channels) and refuses the
    ambiguous case where both candidate axes have size 3; pass "NHWC" or "NCHW" then.
    """
    import torch

    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
        pixels = pixels.copy()  # torch refuses to share read-only numpy memory silently
    x = torch.as_tensor(pixels)
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected a 3-d or 4-d pixel tensor, got shape {tuple(x.shape)}")
    if layout == "auto":
        last, second = x.shape[-1] == 3, x.shape[1] == 3
        if last and second:
            raise ValueError(f"layout of shape {tuple(x.shape)} is ambiguous; pass layout='NHWC' or 'NCHW'")
        if not (last or second):
            raise ValueError(f"no 3-channel axis in shape {tuple(x.shape)}")
        layout = "NHWC" if last else "NCHW"
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif layout != "NCHW":
        raise ValueError(f"layout must be 'auto', 'NHWC' or 'NCHW', got {layout!r}")
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(x.shape)} as {layout}")
    out = x.to(dtype or torch.float32).div(255.0)
    return out.sub_(0.5).div_(0.5).contiguous()


def to_tensors(processed: ProcessedImage, dtype: "torch.dtype | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """(global [1,3,B,B], tiles [N,3,t,t]) float tensors ready for the encoder."""
    glob = normalize(processed.global_view[None], layout="NHWC", dtype=dtype)
    tiles = normalize(processed.tiles, layout="NHWC", dtype=dtype)
    return glob, tiles
