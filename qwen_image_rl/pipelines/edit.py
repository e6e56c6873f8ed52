"""Qwen-Image-Edit sampling in JAX (diffusers `QwenImageEditPipeline`), VAE path.

The source image is resized as diffusers does (`calculate_dimensions` to ~1024^2 pixels at its
aspect ratio, multiples of 32, PIL Lanczos), VAE-encoded (posterior mode), normalised and packed.
Its tokens follow the noisy target tokens in every transformer call, with img_shapes listing
target then source; only the target velocity is used.

LIMITATION (on purpose, until the Qwen2.5-VL vision tower is ported): diffusers conditions the
text encoder on the image too (`<|vision_start|><|image_pad|>...<|vision_end|>` tokens carrying
ViT features). Here a text prompt is encoded with the edit template WITHOUT the image tokens, so
its embeddings differ from diffusers'. For exact diffusers behaviour pass `prompt_embeds`
(+ mask) computed elsewhere; `vision_conditioning=True` raises NotImplementedError.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models import text_encoding
from qwen_image_rl.pipelines import common

VAE_IMAGE_AREA = 1024 * 1024  # diffusers' calculate_dimensions(1024 * 1024, ratio)
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
# The edit template with the image placeholder removed (text-only conditioning).
EDIT_TEXT_ONLY_TEMPLATE = text_encoding.EDIT_TEMPLATE.replace(VISION_TOKENS, "")


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
  """(width, height) with ~target_area pixels at aspect ratio w/h, multiples of 32 (diffusers)."""
  width = math.sqrt(target_area * ratio)
  height = width / ratio
  return round(width / 32) * 32, round(height / 32) * 32


def as_pil_list(image) -> list:
  """PIL image, list of PIL, uint8 array [H,W,3] / [B,H,W,3], or a list of arrays -> [PIL]."""
  from PIL import Image

  if isinstance(image, Image.Image):
    return [image]
  if isinstance(image, (list, tuple)):
    return [im for x in image for im in as_pil_list(x)]
  array = np.asarray(image)
  if array.ndim == 3:
    array = array[None]
  if array.ndim != 4 or array.shape[-1] != 3:
    raise ValueError(f"image: expected uint8 [B, H, W, 3] / [H, W, 3] or PIL, got shape "
                     f"{array.shape}")
  if array.dtype != np.uint8:
    raise ValueError(f"image: expected uint8 pixels, got {array.dtype} (convert [0,1] floats "
                     f"with (x * 255).round().astype(np.uint8))")
  return [Image.fromarray(a) for a in array]


def preprocess_images(images: list, width: int, height: int) -> np.ndarray:
  """diffusers VaeImageProcessor resize (PIL Lanczos) + to [-1, 1], as NHWC float32."""
  from PIL import Image

  resized = [im.convert("RGB").resize((width, height), resample=Image.LANCZOS) for im in images]
  array = np.stack([np.asarray(im).astype(np.float32) / 255.0 for im in resized])
  return 2.0 * array - 1.0


class QwenImageEditPipeline(common.PipelineBase):
  """Image editing, VAE path. See `common.PipelineBase` for construction/loading/saving."""
  PIPELINE_CLASS = "QwenImageEditPipeline"
  TEMPLATE = EDIT_TEXT_ONLY_TEMPLATE
  # No Qwen2VLProcessor is written (transformers 5 cannot build one offline here): load the
  # saved directory in diffusers with `QwenImageEditPipeline.from_pretrained(dir,
  # processor=None)`, which serves prompt_embeds calls (its text-prompt path needs the processor).
  EXTRA_MODEL_INDEX = {"processor": [None, None]}

  def source_dimensions(self, image, image_area: int | None = VAE_IMAGE_AREA):
    """(width, height) the source image is resized to. image_area=None keeps its own area."""
    first = as_pil_list(image)[0]
    w, h = first.size
    area = w * h if image_area is None else image_area
    cw, ch = calculate_dimensions(area, w / h)
    if cw == 0 or ch == 0:
      raise ValueError(f"image {w}x{h} with image_area={image_area} resizes to {cw}x{ch}")
    return cw, ch

  def encode_image(self, image, image_area: int | None = VAE_IMAGE_AREA):
    """Source image(s) -> (normalised NHWC latents [Bi, h, w, z], (width, height) resized to)."""
    images = as_pil_list(image)
    cw, ch = self.source_dimensions(images, image_area)
    pixels = preprocess_images(images, cw, ch)
    with self._context():
      latents = common.encode_normalized(self.vae, self.vae_params, jnp.asarray(pixels))
    return latents, (cw, ch)

  def __call__(self, image, prompt=None, *, prompt_embeds=None, prompt_embeds_mask=None,
               negative_prompt=None, negative_prompt_embeds=None,
               negative_prompt_embeds_mask=None, true_cfg_scale: float = 4.0,
               num_inference_steps: int = 50, height: int | None = None,
               width: int | None = None, seed: int | None = None, latents=None,
               output_type: str = "np", max_sequence_length: int = 512,
               num_images_per_prompt: int = 1, image_area: int | None = VAE_IMAGE_AREA,
               vision_conditioning: bool = False) -> Any:
    """Edit `image` following the prompt.

    image: PIL / list of PIL / uint8 [B, H, W, 3]. image_area: pixels the source is resized to
      (diffusers: 1024^2); None keeps the source's own area (e.g. tiny-world 64x64 images).
    height/width: output size, default the resized source size; floored to a multiple of
      2 * vae_scale_factor. Other arguments as `QwenImagePipeline.__call__`.
    vision_conditioning: must stay False (the VL vision tower is not ported yet).
    """
    if vision_conditioning:
      raise NotImplementedError(
          "QwenImageEditPipeline: the Qwen2.5-VL vision tower is not ported yet, so prompts "
          "cannot be conditioned on the image. Pass prompt_embeds (+ prompt_embeds_mask) "
          "computed elsewhere, or text prompts (encoded without image tokens).")
    common.check_output_type(output_type)
    source, (cw, ch) = self.encode_image(image, image_area)
    multiple = 2 * self.vae_scale_factor
    height = (height or ch) // multiple * multiple
    width = (width or cw) // multiple * multiple
    latent_h, latent_w = common.latent_size(height, width, self.vae_scale_factor)
    batch, embeds, mask, neg_embeds, neg_mask = self._text_inputs(
        prompt, prompt_embeds, prompt_embeds_mask, negative_prompt, negative_prompt_embeds,
        negative_prompt_embeds_mask, true_cfg_scale, num_images_per_prompt, max_sequence_length)
    n_src = source.shape[0]
    if batch % n_src:
      raise ValueError(f"cannot duplicate {n_src} source images to a batch of {batch}")
    # diffusers tiles (torch.cat([x] * k)), it does not repeat each image in place.
    source = jnp.concatenate([source] * (batch // n_src))
    ref_latents = common.pack_latents(source)
    x = self._initial_latents(batch, latent_h, latent_w, seed, latents)
    img_shapes = (common.img_shape(latent_h, latent_w),
                  common.img_shape(source.shape[1], source.shape[2]))
    packed = self._sample(img_shapes, x, embeds, mask, neg_embeds, neg_mask,
                          num_inference_steps, true_cfg_scale, ref_latents)
    return self._output(packed, latent_h, latent_w, output_type)
