"""Edit / Edit-Plus pipelines with image-conditioned prompts vs diffusers, end to end (float32).

A tiny random diffusers QwenImageEditPipeline / QwenImageEditPlusPipeline, with a Qwen2.5-VL
text encoder whose vision tower has O(1) random weights and a locally built Qwen2.5-VL processor
(PIL image backend), is saved with save_pretrained; ours loads the same directory and is called
with text prompts only (no prompt_embeds). 4 steps, true CFG 4, same initial latents.
"""

import os

import numpy as np
import pytest

from qwen_image_rl.models import text_encoding
from qwen_image_rl.pipelines import common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline, QwenImageEditPlusPipeline
from tests import tiny_reference

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

TOL = 1e-3
VAE_AREA = 48 * 48  # instead of 1024^2 on both sides, to keep the test small
CONDITION_AREA = 40 * 40  # instead of 384^2 (Edit-Plus)


def _processor(tokenizer):
  """transformers' Qwen2_5_VLProcessor with the PIL image processor and no video processor
  (its class check wants the torchvision video processor, which cannot be imported here)."""
  from transformers import Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from transformers.processing_utils import ProcessorMixin

  check = ProcessorMixin.check_argument_for_proper_class
  ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
  try:
    return Qwen2_5_VLProcessor(
      image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, video_processor=None
    )
  finally:
    ProcessorMixin.check_argument_for_proper_class = check


@pytest.fixture(scope="module")
def components(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_edit"))
  parts = tiny_reference.build_components(directory)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in parts["text_encoder"].named_parameters():
      if "visual" in name:  # build_components leaves the vision tower at its tiny default init
        p.copy_(
          1.0 + 0.2 * torch.randn_like(p)
          if "norm" in name or "ln_q" in name
          else 0.3 * torch.randn_like(p)
        )
  parts["processor"] = _processor(parts["tokenizer"])
  return parts, directory


def _pipelines(components, torch_cls, ours_cls, name):
  parts, directory = components
  torch_pipe = torch_cls(**parts)
  torch_pipe.prompt_template_encode_start_idx = text_encoding.template_drop_index(
    parts["tokenizer"], ours_cls.VISION_TEMPLATE
  )
  path = os.path.join(directory, name)
  # The processor cannot save without its video processor: save the pipeline without it and
  # write processor/preprocessor_config.json (what hub checkpoints carry) from its image part.
  torch_pipe.processor = None
  torch_pipe.save_pretrained(path)
  torch_pipe.processor = parts["processor"]
  parts["processor"].image_processor.save_pretrained(os.path.join(path, "processor"))
  ours = ours_cls.from_pretrained(path)
  assert ours.has_vision
  return torch_pipe, ours


def _noise(pipe, batch, height, width, seed):
  h, w = common.latent_size(height, width, pipe.vae_scale_factor)
  noise = torch.randn((batch, 1, 4, h, w), generator=torch.Generator().manual_seed(seed))
  return pipe._pack_latents(noise, batch, 4, h, w)


def _with_mrope(text_encoder):
  """transformers v5 uses 3-D image positions only with mm_token_type_ids, which diffusers does
  not pass; this wrapper passes them (what transformers v4, the training setup, did)."""
  forward = text_encoder.forward
  image_token = text_encoder.config.image_token_id

  def wrapped(*args, input_ids=None, **kwargs):
    kwargs["mm_token_type_ids"] = (input_ids == image_token).long()
    return forward(*args, input_ids=input_ids, **kwargs)

  return wrapped


def _images(seed, sizes):
  from PIL import Image

  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _compare(torch_pipe, ours, monkeypatch, image, latents, mrope, **kwargs):
  ours.mrope = mrope
  if mrope:
    monkeypatch.setattr(torch_pipe.text_encoder, "forward", _with_mrope(torch_pipe.text_encoder))
  with torch.no_grad():
    want = torch_pipe(image=image, latents=latents, output_type="np", **kwargs).images
  run = lambda: ours(
    image,
    latents=latents.numpy(),
    output_type="float",
    image_area=VAE_AREA,
    condition_area=CONDITION_AREA,
    **kwargs,
  )
  got = run()
  assert got.shape == want.shape
  err = float(np.abs(np.asarray(got, np.float64) - want).max())
  # The comparison resolves the conditioning: the other position scheme is far further off.
  ours.mrope = not mrope
  other = float(np.abs(run() - want).max())
  print(f"  (other position scheme: max abs err {other:.2e})")
  assert other > max(100 * err, 1e-4)
  return err


@pytest.mark.parametrize("mrope", [False, True])
def test_edit_text_prompt_matches_diffusers(components, monkeypatch, mrope):
  from diffusers import QwenImageEditPipeline as TorchEdit
  from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

  original = pipeline_qwenimage_edit.calculate_dimensions
  monkeypatch.setattr(
    pipeline_qwenimage_edit, "calculate_dimensions", lambda _, ratio: original(VAE_AREA, ratio)
  )
  torch_pipe, ours = _pipelines(components, TorchEdit, QwenImageEditPipeline, "edit")
  image = _images(0, [(32, 48)])[0]
  latents = _noise(torch_pipe, 2, 32, 64, seed=2)
  kwargs = dict(
    prompt="make it red",
    negative_prompt="blurry",
    num_inference_steps=4,
    true_cfg_scale=4.0,
    num_images_per_prompt=2,
  )
  err = _compare(torch_pipe, ours, monkeypatch, image, latents, mrope, **kwargs)
  print(f"Edit (mrope={mrope}) text prompts + image, CFG 4, 4 steps: max abs err {err:.2e}")
  assert err <= TOL
  # The image really conditions the prompt: a text-only encoding differs.
  embeds, _ = ours.encode_prompt_with_images("make it red", _images(0, [(32, 48)]))
  text_only, _ = ours.encode_prompt("make it red")
  assert embeds.shape[1] > text_only.shape[1]


@pytest.mark.parametrize("mrope", [False, True])
def test_edit_plus_two_images_matches_diffusers(components, monkeypatch, mrope):
  from diffusers import QwenImageEditPlusPipeline as TorchEditPlus
  from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

  original = plus.calculate_dimensions
  areas = {plus.CONDITION_IMAGE_SIZE: CONDITION_AREA, plus.VAE_IMAGE_SIZE: VAE_AREA}
  monkeypatch.setattr(
    plus, "calculate_dimensions", lambda area, ratio: original(areas[area], ratio)
  )
  torch_pipe, ours = _pipelines(components, TorchEditPlus, QwenImageEditPlusPipeline, "plus")
  images = _images(1, [(40, 24), (32, 48)])  # output follows the last: 64x32
  latents = _noise(torch_pipe, 1, 32, 64, seed=3)
  # max_sequence_length below the prompt's length: diffusers' edit pipelines do not truncate.
  kwargs = dict(
    prompt="move the circle left",
    negative_prompt="ugly",
    num_inference_steps=4,
    true_cfg_scale=4.0,
    max_sequence_length=8,
  )
  err = _compare(torch_pipe, ours, monkeypatch, images, latents, mrope, **kwargs)
  print(f"Edit-Plus (mrope={mrope}) 2 images, CFG 4, 4 steps: max abs err {err:.2e}")
  assert err <= TOL


def test_image_positions_matter(components):
  """mRoPE vs sequential positions give different embeddings (so both checks above bite)."""
  from diffusers import QwenImageEditPipeline as TorchEdit

  _, ours = _pipelines(components, TorchEdit, QwenImageEditPipeline, "edit_positions")
  image = _images(0, [(32, 48)])
  ours.mrope = True
  a, _ = ours.encode_prompt_with_images("make it red", image)
  ours.mrope = False
  b, _ = ours.encode_prompt_with_images("make it red", image)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
  with pytest.raises(ValueError, match="one image per prompt"):
    ours.encode_prompt_with_images("make it red", image * 2)


def test_save_round_trip_keeps_vision(components, tmp_path):
  from diffusers import QwenImageEditPipeline as TorchEdit

  _, ours = _pipelines(components, TorchEdit, QwenImageEditPipeline, "edit_save")
  out = str(tmp_path / "saved")
  ours.save_pretrained(out)
  reloaded = QwenImageEditPipeline.from_pretrained(out)
  assert reloaded.has_vision and reloaded.image_processor == ours.image_processor
  image = _images(0, [(32, 48)])
  np.testing.assert_array_equal(
    np.asarray(reloaded.encode_prompt_with_images("make it red", image)[0]),
    np.asarray(ours.encode_prompt_with_images("make it red", image)[0]),
  )
  loaded = TorchEdit.from_pretrained(out, processor=None)
  assert loaded.processor is None
