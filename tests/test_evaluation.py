"""Held-out eval sets: rendered once per process, shared read-only, keyed by every setting."""

import ml_collections
import numpy as np
import pytest

from qwen_image_rl import evaluation


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(split="val", num_t2i=4, num_edits=2, image_size=32),
                                        **kw))


def test_eval_sets_are_rendered_once_and_read_only():
  t2i, edits = evaluation.eval_sets(_cfg(), seed=3)
  again_t2i, again_edits = evaluation.eval_sets(_cfg(), seed=3)
  assert again_t2i is t2i and again_edits is edits
  assert len(t2i) == 4 and len(edits) == 2
  with pytest.raises(ValueError, match="read-only"):
    t2i.images[0, 0, 0, 0] = 1
  with pytest.raises(ValueError, match="read-only"):
    edits.sources[0, 0, 0, 0] = 1
  # Another seed or size is another set, not the cached one.
  other, _ = evaluation.eval_sets(_cfg(), seed=4)
  assert other is not t2i and other.prompts != t2i.prompts
  small, none = evaluation.eval_sets(_cfg(image_size=16, num_edits=0), seed=3)
  assert small.images.shape[1:3] == (16, 16) and none is None
  np.testing.assert_array_equal(t2i.images, evaluation.eval_sets(_cfg(), seed=3)[0].images)
