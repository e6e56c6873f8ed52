"""One import for the tiny world: scenes, renderer, captions, edits and the oracle.

from qwen_image_rl.data import tiny_world as tw
rng = np.random.default_rng(0)
spec = tw.sample_scene(rng, 'portrait')
image = tw.render(spec, 64)                 # (64, 64, 3) uint8
prompt = tw.caption(spec, rng)              # 'a portrait of a person with ...'
scores = tw.score_t2i(image, spec)          # well_formed, attributes, identity, overall, quality
edit = tw.sample_edit(rng, 'glasses')       # Edit(kind, source, instruction, target)
tw.score_edit(tw.render(edit.source), tw.render(edit.target), edit)
"""

from qwen_image_rl.data.captions import Prompt, caption, instruction, prompt, vocabulary
from qwen_image_rl.data.edits import (
  EDIT_CATEGORIES,
  EDIT_KINDS,
  Edit,
  make_edit,
  sample_edit,
  sample_edits,
)
from qwen_image_rl.data.oracle import (
  ALIGNMENT_DIMS,
  changed_region,
  identity_embedding,
  identity_similarity,
  image_quality,
  mean_scores,
  score_edit,
  score_edit_batch,
  score_t2i,
  score_t2i_batch,
)
from qwen_image_rl.data.render import render, render_batch
from qwen_image_rl.data.world import (
  CATEGORIES,
  SPLITS,
  GeneralScene,
  LandscapeScene,
  PortraitScene,
  Shape,
  TypographyScene,
  from_dict,
  sample_scene,
  sample_scenes,
  spec_key,
  split_of,
  to_dict,
)
