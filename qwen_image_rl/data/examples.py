"""In-memory example sets of the tiny world, for the trainers and evaluation.

Everything is a pure function of (seed, split, n, size), so every process and every resumed run
sees the same examples. A training batch is then a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_image_rl.data import captions, edits, prompt_files, render, world


@dataclasses.dataclass(frozen=True)
class T2IExamples:
  images: np.ndarray  # uint8 [N, H, W, 3]
  prompts: tuple[str, ...]
  categories: tuple[str, ...]
  specs: tuple

  def __len__(self):
    return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class EditExamples:
  sources: np.ndarray  # uint8 [N, H, W, 3]
  targets: np.ndarray  # uint8 [N, H, W, 3]
  instructions: tuple[str, ...]
  categories: tuple[str, ...]
  edits: tuple

  def __len__(self):
    return len(self.instructions)


def _split_seed(seed: int, split: str, salt: int) -> int:
  return int(np.random.SeedSequence([seed, world.SPLITS.index(split), salt]).generate_state(1)[0])


def t2i_examples(
  seed: int, n: int, split: str, size: int, categories=world.CATEGORIES
) -> T2IExamples:
  """n scenes of `split`, cycling through `categories`, each with one paraphrased prompt."""
  for c in categories:
    world.check_category(c)
  specs = world.sample_scenes(_split_seed(seed, split, 0), n, tuple(categories), split)
  rng = np.random.default_rng(_split_seed(seed, split, 1))
  prompts = [captions.prompt(s, rng) for s in specs]
  return T2IExamples(
    images=render.render_batch(specs, size),
    prompts=tuple(p.text for p in prompts),
    categories=tuple(p.category for p in prompts),
    specs=tuple(specs),
  )


def write_t2i_prompt_file(path: str, seed: int, n: int, split: str, size: int) -> None:
  """Writes `n` T2I prompts of `split` as a prompt file whose records carry their scene specs, so
  an RL run (`data.prompt_file`) on them can be scored by the oracle."""
  ex = t2i_examples(seed, n, split, size)
  records = [
    prompt_files.PromptRecord(prompt=p, category=c, extra={"spec": world.to_dict(s)})
    for p, c, s in zip(ex.prompts, ex.categories, ex.specs)
  ]
  prompt_files.write_prompt_file(path, records)


def edit_examples(seed: int, n: int, split: str, size: int, kinds=edits.EDIT_KINDS) -> EditExamples:
  """n edit triples of `split` (split of the source scene), cycling through `kinds`."""
  triples = edits.sample_edits(_split_seed(seed, split, 2), n, tuple(kinds), split)
  return EditExamples(
    sources=render.render_batch([e.source for e in triples], size),
    targets=render.render_batch([e.target for e in triples], size),
    instructions=tuple(e.instruction for e in triples),
    categories=tuple(e.category for e in triples),
    edits=tuple(triples),
  )


def batch_indices(seed: int, step: int, n: int, batch_size: int, stream: int = 0) -> np.ndarray:
  """Indices of the examples in the batch of `step`: a pure function of (seed, step, stream)."""
  rng = np.random.default_rng([seed, step, stream])
  return rng.integers(0, n, size=batch_size)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the VAE's input range."""
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 (rounded)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)
