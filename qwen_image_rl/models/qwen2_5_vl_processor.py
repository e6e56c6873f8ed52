"""Qwen2-VL image preprocessing in numpy (transformers' `Qwen2VLImageProcessorPil`).

Per image: convert to RGB (alpha composited onto white, grayscale / palette expanded), resize
with PIL bicubic to `smart_resize`'s size (multiples of patch * merge, pixel count inside
[min_pixels, max_pixels], aspect ratio kept), scale to [0, 1], normalise with the CLIP mean/std,
cut into patches: rows of C * temporal_patch * patch^2 values (the single frame repeated over
the temporal patch), ordered 2x2 merge group by merge group. transformers uses this PIL backend
when torchvision is absent (as here); the torchvision backend resizes slightly differently.

Also the image-token expansion of the Qwen2.5-VL processor: each `<|image_pad|>` in a prompt
becomes grid_t * grid_h * grid_w / merge^2 copies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD = "<|image_pad|>"
MAX_ASPECT_RATIO = 200


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = 56 * 56,
  max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
  """(height, width): multiples of `factor`, pixels in [min_pixels, max_pixels], same aspect."""
  if min(height, width) < 1:
    raise ValueError(f"image of {height}x{width} pixels is empty")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(
      f"image {height}x{width}: absolute aspect ratio must be at most "
      f"{MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.1f}"
    )
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image):
  """PIL image (any mode) or uint8 array [H, W] / [H, W, 1|3|4] -> RGB PIL image."""
  from PIL import Image

  if not isinstance(image, Image.Image):
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise ValueError(f"image: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
      raise ValueError(
        f"image: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}"
      )
    image = Image.fromarray(array)
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """transformers' Qwen2-VL image processor defaults (min/max pixels as its `size`)."""

  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD

  @classmethod
  def from_dict(cls, config: dict) -> ImageProcessor:
    """From a preprocessor_config.json dict (size.shortest_edge / longest_edge or min/max)."""
    size = config.get("size") or {}
    fields = dict(
      min_pixels=config.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
      max_pixels=config.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
    )
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
      if key in config:
        fields[key] = int(config[key])
    for key in ("image_mean", "image_std"):
      if key in config:
        fields[key] = tuple(float(x) for x in config[key])
    return cls(**fields)

  def to_dict(self) -> dict:
    """preprocessor_config.json fields transformers' Qwen2-VL image processor reads."""
    return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
      "min_pixels": self.min_pixels,
      "max_pixels": self.max_pixels,
      "patch_size": self.patch_size,
      "temporal_patch_size": self.temporal_patch_size,
      "merge_size": self.merge_size,
      "image_mean": list(self.image_mean),
      "image_std": list(self.image_std),
      "do_resize": True,
      "do_rescale": True,
      "do_normalize": True,
      "do_convert_rgb": True,
      "resample": 3,
    }

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

  def patchify(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised float image [C, H, W] -> (patch rows [N, C*T*P*P], (1, grid_h, grid_w))."""
    c, h, w = image.shape
    p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
    gh, gw = h // p, w // p
    patches = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], patches.shape[:5] + (t, p, p))
    return patches.reshape(gh * gw, c * t * p * p), (1, gh, gw)

  def preprocess_one(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
    from PIL import Image

    rgb = to_rgb(image)
    height, width = self.resized_size(rgb.height, rgb.width)
    resized = np.asarray(rgb.resize((width, height), resample=Image.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(self.image_mean, np.float32)
    std = np.asarray(self.image_std, np.float32)
    normalised = ((scaled - mean) / std).transpose(2, 0, 1)
    return self.patchify(np.ascontiguousarray(normalised, dtype=np.float32))

  def __call__(self, images) -> dict[str, np.ndarray]:
    """{"pixel_values": [sum N, C*T*P*P] float32, "image_grid_thw": [n, 3] int64}."""
    if not isinstance(images, (list, tuple)):
      images = [images]
    if not images:
      raise ValueError("ImageProcessor: no images")
    rows, grids = zip(*(self.preprocess_one(im) for im in images))
    return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.asarray(grids, np.int64)}

  def tokens_per_image(self, image_grid_thw) -> list[int]:
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    return (grid.prod(-1) // self.merge_size**2).tolist()


def expand_image_tokens(texts: Sequence[str], image_grid_thw, merge_size: int = 2) -> list[str]:
  """Replace each `<|image_pad|>` with one per merged image token (images in text order)."""
  counts = iter((np.asarray(image_grid_thw).reshape(-1, 3).prod(-1) // merge_size**2).tolist())
  out = []
  for text in texts:
    parts = text.split(IMAGE_PAD)
    pieces = [parts[0]]
    for part in parts[1:]:
      try:
        pieces.append(IMAGE_PAD * next(counts) + part)
      except StopIteration:
        raise ValueError("more <|image_pad|> placeholders than images") from None
    out.append("".join(pieces))
  if next(counts, None) is not None:
    raise ValueError("more images than <|image_pad|> placeholders")
  return out
