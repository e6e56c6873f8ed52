"""Qwen-Image sampling pipelines in JAX: text-to-image and edit (VAE path)."""

from qwen_image_rl.pipelines.common import (
  decode_packed,
  denoise,
  encode_normalized,
  latent_size,
  make_denoise,
  pack_latents,
  unpack_latents,
)
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline, calculate_dimensions
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline

__all__ = [
  "QwenImageEditPipeline",
  "QwenImagePipeline",
  "calculate_dimensions",
  "decode_packed",
  "denoise",
  "encode_normalized",
  "latent_size",
  "make_denoise",
  "pack_latents",
  "unpack_latents",
]
