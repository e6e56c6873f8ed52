"""The tiny world's ground truth as JSON: the `judge_context` request field the oracle judge reads.

  {'rubric': 'alignment', 'category': 'general', 'spec': world.to_dict(scene)}     text-to-image
  {'rubric': 'preservation', 'category': ..., 'edit': edit_to_dict(edit)}          edits

A caption does not determine its scene uniquely in general (templates paraphrase, and some
leave attributes out of the words the oracle scores), so the spec travels as structured data
next to the prompt text instead of being parsed back from it. A learned judge ignores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qwen_image_rl.data import edits as edits_lib
from qwen_image_rl.data import world

T2I_RUBRICS = ('alignment', 'aesthetics', 'portrait')
EDIT_RUBRICS = ('instruction_following', 'identity', 'preservation')
RUBRICS = T2I_RUBRICS + EDIT_RUBRICS


# The edit's JSON form lives with the edits; these names are the serving API's.
edit_to_dict = edits_lib.to_dict
edit_from_dict = edits_lib.from_dict


def judge_context(rubric: str, category: str, meta: Mapping[str, Any] | None) -> dict:
  """One sample's context: {'rubric', 'category'} plus its 'spec' and/or 'edit' (JSON-ready)."""
  context: dict[str, Any] = {'rubric': rubric, 'category': category}
  meta = meta or {}
  if 'spec' in meta:
    spec = meta['spec']
    context['spec'] = spec if isinstance(spec, dict) else world.to_dict(spec)
  if 'edit' in meta:
    edit = meta['edit']
    context['edit'] = edit if isinstance(edit, dict) else edit_to_dict(edit)
  return context
