"""Qwen-Image-Edit sampling in JAX (diffusers `QwenImageEditPipeline` / `...EditPlusPipeline`).

The source image is resized as diffusers does (`calculate_dimensions` to ~1024^2 pixels at its
aspect ratio, multiples of 32, PIL Lanczos), VAE-encoded (posterior mode), normalised and packed.
Its tokens follow the noisy target tokens in every transformer call, with img_shapes listing
target then source(s); only the target velocity is used.

Prompt conditioning: with a vision tower (loaded from a diffusers directory that has a
`processor/`, or given with `attach_vision`), text prompts are encoded together with the source
image(s) exactly as diffusers does: the edit template with `<|vision_start|><|image_pad|>
<|vision_end|>` (Edit-Plus: "Picture i: ..." per image, images resized to ~384^2 first), the
Qwen2-VL image processor, the Qwen2.5-VL vision tower and language model. Without one, a text
prompt is encoded with the edit template WITHOUT the image tokens (embeddings differ from
diffusers'); `prompt_embeds` (+ mask) always work.
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models import text_encoding
from qwen_image_rl.models.qwen2_5_vl_full import Qwen25VL
from qwen_image_rl.models.qwen2_5_vl_processor import ImageProcessor
from qwen_image_rl.pipelines import common

VAE_IMAGE_AREA = 1024 * 1024  # diffusers' calculate_dimensions(1024 * 1024, ratio)
CONDITION_IMAGE_AREA = 384 * 384  # Edit-Plus: images the VL model sees
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
    raise ValueError(
      f"image: expected uint8 [B, H, W, 3] / [H, W, 3] or PIL, got shape {array.shape}"
    )
  if array.dtype != np.uint8:
    raise ValueError(
      f"image: expected uint8 pixels, got {array.dtype} (convert [0,1] floats "
      f"with (x * 255).round().astype(np.uint8))"
    )
  return [Image.fromarray(a) for a in array]


def resize_images(images: list, width: int, height: int) -> list:
  """diffusers VaeImageProcessor.resize: PIL Lanczos to (width, height)."""
  from PIL import Image

  return [im.convert("RGB").resize((width, height), resample=Image.LANCZOS) for im in images]


def preprocess_images(images: list, width: int, height: int) -> np.ndarray:
  """diffusers VaeImageProcessor resize (PIL Lanczos) + to [-1, 1], as NHWC float32."""
  resized = resize_images(images, width, height)
  array = np.stack([np.asarray(im).astype(np.float32) / 255.0 for im in resized])
  return 2.0 * array - 1.0


class QwenImageEditPipeline(common.PipelineBase):
  """Image editing, VAE path. See `common.PipelineBase` for construction/loading/saving.

  Extra keyword arguments: vision (a `Qwen25VLVisionModel`), vision_params, image_processor
  (`ImageProcessor`), image_token_id, vision_drop_idx (tokens of the vision template dropped;
  default counted with the tokenizer) and mrope (see `text_encoding.encode_prompts_with_images`).
  """

  PIPELINE_CLASS = "QwenImageEditPipeline"
  TEMPLATE = EDIT_TEXT_ONLY_TEMPLATE
  VISION_TEMPLATE = text_encoding.EDIT_TEMPLATE
  # No Qwen2VLProcessor is written (transformers 5 cannot build one offline here): load the
  # saved directory in diffusers with `QwenImageEditPipeline.from_pretrained(dir,
  # processor=None)`, which serves prompt_embeds calls (its text-prompt path needs the processor).
  EXTRA_MODEL_INDEX = {"processor": [None, None]}

  def __init__(
    self,
    *args,
    vision=None,
    vision_params=None,
    image_processor=None,
    image_token_id: int | None = None,
    vision_drop_idx: int | None = None,
    mrope: bool = True,
    **kwargs,
  ):
    super().__init__(*args, **kwargs)
    self.vl_model = self.vl_params = None
    self.mrope = mrope
    if vision is not None:
      self.attach_vision(vision, vision_params, image_token_id, image_processor, vision_drop_idx)

  def attach_vision(
    self,
    vision,
    vision_params,
    image_token_id: int,
    image_processor: ImageProcessor | None = None,
    vision_drop_idx: int | None = None,
  ) -> None:
    """Encode text prompts together with the source image(s), as diffusers does."""
    if self.text_encoder is None or self.tokenizer is None:
      raise ValueError("attach_vision needs the pipeline's text encoder and tokenizer")
    if vision.config.out_hidden_size != self.text_encoder.hidden_size:
      raise ValueError(
        f"vision out_hidden_size={vision.config.out_hidden_size} != text "
        f"hidden_size={self.text_encoder.hidden_size}"
      )
    self.vl_model = Qwen25VL(self.text_encoder, vision, int(image_token_id))
    self.vl_params = {
      "visual": nn.meta.unbox(vision_params),
      "language_model": self.text_encoder_params,
    }
    self.image_processor = image_processor or ImageProcessor(
      patch_size=vision.config.patch_size,
      merge_size=vision.config.spatial_merge_size,
      temporal_patch_size=vision.config.temporal_patch_size,
    )
    if vision_drop_idx is None:
      vision_drop_idx = text_encoding.template_drop_index(self.tokenizer, self.VISION_TEMPLATE)
    self.vision_drop_idx = vision_drop_idx

  @property
  def has_vision(self) -> bool:
    return self.vl_model is not None

  @classmethod
  def from_pretrained(cls, directory: str, dtype=jnp.float32, **kwargs):
    """As `PipelineBase.from_pretrained`; a `processor/` directory (diffusers writes one) turns
    on image-conditioned prompts with the text encoder's vision tower."""
    from qwen_image_rl.convert.qwen2_5_vl import vision_from_text_encoder_extra
    from qwen_image_rl.convert.safetensors_io import read_json

    pipe = super().from_pretrained(directory, dtype, **kwargs)
    config = os.path.join(directory, "processor", "preprocessor_config.json")
    if pipe.text_encoder is not None and os.path.exists(config):
      vision, params, image_token_id = vision_from_text_encoder_extra(
        pipe.text_encoder_extra, dtype
      )
      pipe.attach_vision(
        vision, params, image_token_id, ImageProcessor.from_dict(read_json(config))
      )
    return pipe

  def save_pretrained(self, directory: str) -> None:
    """As `PipelineBase.save_pretrained`, plus processor/preprocessor_config.json when a vision
    tower is attached, so that `from_pretrained` restores image-conditioned prompts."""
    import json

    super().save_pretrained(directory)
    if self.has_vision:
      os.makedirs(os.path.join(directory, "processor"), exist_ok=True)
      with open(os.path.join(directory, "processor", "preprocessor_config.json"), "w") as f:
        json.dump(self.image_processor.to_dict(), f, indent=2)

  def encode_prompt_with_images(self, prompt, images: list):
    """(embeds [B, T, D], mask [B, T]) of prompt(s) shown `images` (each prompt sees all)."""
    if not self.has_vision:
      raise NotImplementedError(
        f"{type(self).__name__} has no vision tower: load a diffusers "
        "directory with processor/ or call attach_vision"
      )
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [self.VISION_TEMPLATE.format(self._image_prompt(p, len(images))) for p in prompts]
    with self._context():
      return text_encoding.encode_prompts_with_images(
        self.vl_model,
        self.vl_params,
        self.tokenizer,
        self.image_processor,
        texts,
        list(images) * len(prompts),
        drop_idx=self.vision_drop_idx,
        mrope=self.mrope,
      )

  def _prompt_inputs(
    self, prompt, embeds, mask, num_images_per_prompt, max_sequence_length, what: str
  ):
    # diffusers' edit pipelines never cut prompt embeddings (an image alone can be ~1300
    # tokens); max_sequence_length only bounds text-only encoding here.
    if embeds is not None:
      max_sequence_length = max(max_sequence_length, np.shape(embeds)[1])
    return super()._prompt_inputs(
      prompt, embeds, mask, num_images_per_prompt, max_sequence_length, what
    )

  def _image_prompt(self, prompt: str, num_images: int) -> str:
    if num_images != 1:
      raise ValueError(
        f"{type(self).__name__} shows one image per prompt, got {num_images} "
        "(use QwenImageEditPlusPipeline for several)"
      )
    return prompt

  def source_dimensions(self, image, image_area: int | None = VAE_IMAGE_AREA):
    """(width, height) the source image is resized to. image_area=None keeps its own area."""
    first = as_pil_list(image)[0]
    return _dimensions(first, image_area)

  def encode_image(self, image, image_area: int | None = VAE_IMAGE_AREA):
    """Source image(s) -> (normalised NHWC latents [Bi, h, w, z], (width, height) resized to)."""
    images = as_pil_list(image)
    cw, ch = self.source_dimensions(images, image_area)
    pixels = preprocess_images(images, cw, ch)
    with self._context():
      latents = common.encode_normalized(self.vae, self.vae_params, jnp.asarray(pixels))
    return latents, (cw, ch)

  def _conditioning(self, image, image_area, condition_area):
    """(packed source tokens per image [Bi, S, C] list, their latent shapes, (cw, ch) of the
    output default, the images the VL model sees)."""
    images = as_pil_list(image)
    source, (cw, ch) = self.encode_image(images, image_area)
    return [source], (cw, ch), resize_images(images[:1], cw, ch)

  def __call__(
    self,
    image,
    prompt=None,
    *,
    prompt_embeds=None,
    prompt_embeds_mask=None,
    negative_prompt=None,
    negative_prompt_embeds=None,
    negative_prompt_embeds_mask=None,
    true_cfg_scale: float = 4.0,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    latents=None,
    output_type: str = "np",
    max_sequence_length: int = 512,
    num_images_per_prompt: int = 1,
    image_area: int | None = VAE_IMAGE_AREA,
    condition_area: int | None = CONDITION_IMAGE_AREA,
    vision_conditioning: bool | None = None,
  ) -> Any:
    """Edit `image` following the prompt.

    image: PIL / list of PIL / uint8 [B, H, W, 3]. image_area: pixels the source is resized to
      (diffusers: 1024^2); None keeps the source's own area (e.g. tiny-world 64x64 images).
      condition_area: Edit-Plus only, pixels of the images the VL model sees (diffusers 384^2).
    height/width: output size, default the resized source size; floored to a multiple of
      2 * vae_scale_factor. Other arguments as `QwenImagePipeline.__call__`.
    vision_conditioning: encode text prompts with the image (diffusers' behaviour). None: when
      the pipeline has a vision tower. True without one raises NotImplementedError.
    """
    if vision_conditioning is None:
      vision_conditioning = self.has_vision
    if vision_conditioning and not self.has_vision:
      raise NotImplementedError(
        f"{type(self).__name__}: no Qwen2.5-VL vision tower is loaded, so prompts cannot be "
        "conditioned on the image. Load a diffusers directory with processor/, call "
        "attach_vision, pass prompt_embeds, or pass text prompts (encoded without images)."
      )
    common.check_output_type(output_type)
    sources, (cw, ch), vl_images = self._conditioning(image, image_area, condition_area)
    if vision_conditioning:
      if prompt is not None:
        prompt_embeds, prompt_embeds_mask = self.encode_prompt_with_images(prompt, vl_images)
        prompt = None
      if negative_prompt is not None and true_cfg_scale > 1:
        negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt_with_images(
          negative_prompt, vl_images
        )
        negative_prompt = None
    multiple = 2 * self.vae_scale_factor
    height = (height or ch) // multiple * multiple
    width = (width or cw) // multiple * multiple
    latent_h, latent_w = common.latent_size(height, width, self.vae_scale_factor)
    batch, embeds, mask, neg_embeds, neg_mask = self._text_inputs(
      prompt,
      prompt_embeds,
      prompt_embeds_mask,
      negative_prompt,
      negative_prompt_embeds,
      negative_prompt_embeds_mask,
      true_cfg_scale,
      num_images_per_prompt,
      max_sequence_length,
    )
    packed_sources = []
    for source in sources:
      n_src = source.shape[0]
      if batch % n_src:
        raise ValueError(f"cannot duplicate {n_src} source images to a batch of {batch}")
      # diffusers tiles (torch.cat([x] * k)), it does not repeat each image in place.
      packed_sources.append(common.pack_latents(jnp.concatenate([source] * (batch // n_src))))
    ref_latents = jnp.concatenate(packed_sources, axis=1)
    x = self._initial_latents(batch, latent_h, latent_w, seed, latents)
    img_shapes = (common.img_shape(latent_h, latent_w),) + tuple(
      common.img_shape(s.shape[1], s.shape[2]) for s in sources
    )
    packed = self._sample(
      img_shapes,
      x,
      embeds,
      mask,
      neg_embeds,
      neg_mask,
      num_inference_steps,
      true_cfg_scale,
      ref_latents,
    )
    return self._output(packed, latent_h, latent_w, output_type)


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
  """Multi-image editing (diffusers `QwenImageEditPlusPipeline`): every reference image is
  VAE-encoded at its own ~1024^2 size, all their tokens follow the target's, and the VL model
  sees each at ~384^2 announced as "Picture i:". The output size follows the last image."""

  PIPELINE_CLASS = "QwenImageEditPlusPipeline"
  TEMPLATE = text_encoding.EDIT_PLUS_TEMPLATE
  VISION_TEMPLATE = text_encoding.EDIT_PLUS_TEMPLATE

  def _image_prompt(self, prompt: str, num_images: int) -> str:
    return text_encoding.edit_plus_prompt(prompt, num_images)

  def _conditioning(self, image, image_area, condition_area):
    images = as_pil_list(image)
    sources, vl_images = [], []
    for im in images:
      vw, vh = _dimensions(im, image_area)
      with self._context():
        sources.append(
          common.encode_normalized(
            self.vae, self.vae_params, jnp.asarray(preprocess_images([im], vw, vh))
          )
        )
      vl_images += resize_images([im], *_dimensions(im, condition_area))
    return sources, _dimensions(images[-1], image_area), vl_images


def _dimensions(image, area: int | None) -> tuple[int, int]:
  w, h = image.size
  cw, ch = calculate_dimensions(w * h if area is None else area, w / h)
  if cw == 0 or ch == 0:
    raise ValueError(f"image {w}x{h} with area={area} resizes to {cw}x{ch}")
  return cw, ch
