"""Qwen-Image text-to-image sampling in JAX (diffusers `QwenImagePipeline`).

    pipe = QwenImagePipeline.from_pretrained("/ckpt/Qwen-Image")
    images = pipe("a red circle", negative_prompt=" ", num_inference_steps=50, seed=0)

Same defaults and rules as diffusers: height/width default to 128 * vae_scale_factor and sizes
not divisible by 2 * vae_scale_factor are floored (the image comes out smaller, diffusers only
warns); true CFG runs only when true_cfg_scale > 1 AND a negative prompt (or its embeddings) is
given; the schedule's dynamic shift uses the packed target sequence length. The whole
denoising loop is one jitted `common.denoise`.
"""

from __future__ import annotations

from qwen_image_rl.models import text_encoding
from qwen_image_rl.pipelines import common


class QwenImagePipeline(common.PipelineBase):
  """Text-to-image. See `common.PipelineBase` for construction, loading and saving."""

  PIPELINE_CLASS = "QwenImagePipeline"
  TEMPLATE = text_encoding.T2I_TEMPLATE

  def output_size(self, height=None, width=None) -> tuple[int, int]:
    """Pixel size of the images a call with this height/width returns."""
    height, width = common.default_hw(height, width, self.vae_scale_factor)
    h, w = common.latent_size(height, width, self.vae_scale_factor)
    return h * self.vae_scale_factor, w * self.vae_scale_factor

  def __call__(
    self,
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
  ):
    """Sample images.

    prompt / prompt_embeds (+ mask): exactly one. latents: packed [B, S, 4C] (as diffusers) or
    NHWC [B, h, w, C] initial noise; else drawn from `seed`. output_type: 'np' (uint8
    [B, H, W, 3]), 'float' (float32 in [0, 1]) or 'latent' (packed float32 latents).
    """
    common.check_output_type(output_type)
    height, width = common.default_hw(height, width, self.vae_scale_factor)
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
    x = self._initial_latents(batch, latent_h, latent_w, seed, latents)
    img_shapes = (common.img_shape(latent_h, latent_w),)
    packed = self._sample(
      img_shapes, x, embeds, mask, neg_embeds, neg_mask, num_inference_steps, true_cfg_scale
    )
    return self._output(packed, latent_h, latent_w, output_type)
