"""tfds builders for the tiny world (text-to-image and edit), generated locally, no downloads.

  from qwen_image_rl.data import tfds_builders
  for ex in tfds_builders.build_and_load('tiny_world_t2i', '/tmp/tfds', 'train', image_size=32,
                                         num_train=64):
    ex['image'], ex['prompt'], ex['category'], ex['spec']   # numpy uint8 HxWx3, bytes, int, bytes

The examples are exactly the in-memory sets of `examples.py`: split `s` with n examples is
examples.t2i_examples(seed, n, s, image_size, categories) (resp. edit_examples with `kinds`),
in the same order (`index` is the position in that set; shuffling is disabled so the records are
read in that order too). Scenes of different splits are disjoint (world.split_of; edits by their
source scene). The tfds 'validation' split is the world's 'val'.

Importing this module imports tensorflow_datasets but not TensorFlow; TF loads when a dataset is
prepared or read. Nothing else in the package imports this module, so the rest never pays for it.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from qwen_image_rl.data import edits, examples, render, world

DATASET_VERSION = '1.0.0'
TFDS_SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}  # tfds -> world split
# examples.*_examples render every image up front; we take only their specs and texts from a
# cheap, small rendering and render each record at full size as it is written.
_SPEC_ONLY_SIZE = 16


# ---------------------------------------------------------------------------------------------
# Canonical JSON of an edit triple (a scene's is world.spec_key).
# ---------------------------------------------------------------------------------------------


def edit_key(edit: edits.Edit) -> str:
  """Canonical JSON of an edit: kind, instruction, source and target scene dicts."""
  return json.dumps(
    {
      'kind': edit.kind,
      'instruction': edit.instruction,
      'source': world.to_dict(edit.source),
      'target': world.to_dict(edit.target),
    },
    sort_keys=True,
    separators=(',', ':'),
  )


def edit_from_key(text) -> edits.Edit:
  d = json.loads(text)
  return edits.Edit(
    kind=d['kind'],
    source=world.from_dict(d['source']),
    instruction=d['instruction'],
    target=world.from_dict(d['target']),
  )


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, kw_only=True)
class TinyWorldConfig(tfds.core.BuilderConfig):
  """Sizes, resolution and seed; `name` is derived from them when left empty.

  `subset` restricts the categories (T2I) or edit kinds (edit); empty means all of them.
  """

  name: str = ''
  version: str | None = DATASET_VERSION
  image_size: int = 64
  num_train: int = 2048
  num_validation: int = 256
  num_test: int = 256
  seed: int = 0
  subset: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.image_size, int) or self.image_size < 16:
      raise ValueError(f'TinyWorldConfig.image_size must be an int >= 16, got {self.image_size!r}')
    for split in TFDS_SPLITS:
      n = getattr(self, f'num_{split}')
      if not isinstance(n, int) or n < 1:
        raise ValueError(f'TinyWorldConfig.num_{split} must be an int >= 1, got {n!r}')
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f'TinyWorldConfig.seed must be an int >= 0, got {self.seed!r}')
    if isinstance(self.subset, str):
      raise ValueError(f'TinyWorldConfig.subset must be a tuple of names, got {self.subset!r}')
    self.subset = tuple(self.subset)
    if not self.name:
      self.name = (
        f's{self.image_size}_n{self.num_train}_{self.num_validation}_{self.num_test}'
        f'_seed{self.seed}' + ''.join(f'_{s}' for s in self.subset)
      )

  def num_examples(self, tfds_split: str) -> int:
    return getattr(self, f'num_{tfds_split}')


CONFIG_FIELDS = ('image_size', 'num_train', 'num_validation', 'num_test', 'seed', 'subset')


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------


class _TinyWorldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: configs from constructor arguments, the three splits."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: 'First release.'}
  BUILDER_CONFIGS = [TinyWorldConfig(description='The tiny default: 2048/256/256 at 64 px.')]
  _SUBSET_NAMES: tuple[str, ...] = ()  # allowed values of config.subset
  _SUBSET_FIELD = ''

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup needs the `importlib_resources` backport for builders that live in an
    # installed package (tfds 4.9.10); this file is the answer it would compute.
    return epath.Path(__file__)

  def __init__(self, *, config=None, **kwargs):
    """Accepts tfds arguments plus any of CONFIG_FIELDS, which build (or pick) the config."""
    overrides = {k: kwargs.pop(k) for k in CONFIG_FIELDS if k in kwargs}
    if overrides:
      if config is not None and not isinstance(config, TinyWorldConfig):
        raise ValueError(
          f'pass either config={config!r} or config fields {sorted(overrides)}, not both'
        )
      config = self.make_config(base=config, **overrides)
    super().__init__(config=config, **kwargs)

  @classmethod
  def make_config(cls, base: TinyWorldConfig | None = None, **fields) -> TinyWorldConfig:
    """A config with `fields` changed from `base` (default: the tiny default); reuses the
    predefined instance when the result has its name (tfds rejects lookalikes)."""
    unknown = sorted(set(fields) - set(CONFIG_FIELDS))
    if unknown:
      raise TypeError(f'unknown config fields {unknown}; known: {CONFIG_FIELDS}')
    base = base or cls.BUILDER_CONFIGS[0]
    values = {k: getattr(base, k) for k in CONFIG_FIELDS}
    values.update(fields)
    bad = [s for s in values['subset'] if s not in cls._SUBSET_NAMES]
    if bad:
      raise ValueError(
        f'{cls.__name__} subset ({cls._SUBSET_FIELD}) has unknown names {bad}; '
        f'known: {cls._SUBSET_NAMES}'
      )
    config = TinyWorldConfig(**values)
    for predefined in cls.BUILDER_CONFIGS:
      if predefined.name == config.name:
        return predefined
    return config

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated; nothing to download.
    return {split: self._generate_examples(split) for split in TFDS_SPLITS}

  def _subset(self) -> tuple[str, ...]:
    return self.builder_config.subset or self._SUBSET_NAMES


class TinyWorldT2I(_TinyWorldBuilder):
  """Tiny-world text-to-image pairs: image, prompt, category, spec (canonical JSON)."""

  name = 'tiny_world_t2i'
  _SUBSET_NAMES = world.CATEGORIES
  _SUBSET_FIELD = 'categories'

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'index': tfds.features.Scalar(dtype=np.int64),
          'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
          'prompt': tfds.features.Text(),
          'category': tfds.features.ClassLabel(names=world.CATEGORIES),
          'spec': tfds.features.Text(),
        }
      ),
      supervised_keys=('prompt', 'image'),
      disable_shuffling=True,
    )

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    ex = examples.t2i_examples(
      cfg.seed, cfg.num_examples(split), TFDS_SPLITS[split], _SPEC_ONLY_SIZE, self._subset()
    )
    for i, (spec, prompt, category) in enumerate(zip(ex.specs, ex.prompts, ex.categories)):
      yield (
        i,
        {
          'index': i,
          'image': render.render(spec, cfg.image_size),
          'prompt': prompt,
          'category': category,
          'spec': world.spec_key(spec),
        },
      )


class TinyWorldEdit(_TinyWorldBuilder):
  """Tiny-world edit triples: source/target images, instruction, kind, category, spec (JSON)."""

  name = 'tiny_world_edit'
  _SUBSET_NAMES = edits.EDIT_KINDS
  _SUBSET_FIELD = 'edit kinds'

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    image = lambda: tfds.features.Image(shape=(size, size, 3), encoding_format='png')
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'index': tfds.features.Scalar(dtype=np.int64),
          'source_image': image(),
          'target_image': image(),
          'instruction': tfds.features.Text(),
          'kind': tfds.features.ClassLabel(names=edits.EDIT_KINDS),
          'category': tfds.features.ClassLabel(names=world.CATEGORIES),
          'spec': tfds.features.Text(),
        }
      ),
      disable_shuffling=True,
    )

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    ex = examples.edit_examples(
      cfg.seed, cfg.num_examples(split), TFDS_SPLITS[split], _SPEC_ONLY_SIZE, self._subset()
    )
    for i, edit in enumerate(ex.edits):
      yield (
        i,
        {
          'index': i,
          'source_image': render.render(edit.source, cfg.image_size),
          'target_image': render.render(edit.target, cfg.image_size),
          'instruction': edit.instruction,
          'kind': edit.kind,
          'category': edit.category,
          'spec': edit_key(edit),
        },
      )


BUILDERS = {TinyWorldT2I.name: TinyWorldT2I, TinyWorldEdit.name: TinyWorldEdit}


# ---------------------------------------------------------------------------------------------
# Prepare and load.
# ---------------------------------------------------------------------------------------------


def tfds_split(split: str) -> str:
  """Accepts the world's 'val' for tfds' 'validation', also in slices like 'val[:10]'."""
  return re.sub(r'^val(?=$|\[)', 'validation', split)


def get_builder(name: str, data_dir, **config_fields) -> _TinyWorldBuilder:
  if name not in BUILDERS:
    raise ValueError(f'unknown tiny-world dataset {name!r}; known: {tuple(BUILDERS)}')
  return BUILDERS[name](data_dir=data_dir, **config_fields)


def build_and_load(
  name: str,
  data_dir,
  split: str,
  *,
  batch_size: int | None = None,
  as_numpy: bool = True,
  shuffle_files: bool = False,
  **config_fields,
):
  """Prepares `name` under data_dir (once; a no-op when already there) and reads `split`.

  config_fields: any of CONFIG_FIELDS (image_size, num_train, num_validation, num_test, seed,
  subset). Returns a numpy iterable of dicts (as_numpy) or the tf.data.Dataset.
  """
  builder = get_builder(name, data_dir, **config_fields)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  )
  ds = builder.as_dataset(
    split=tfds_split(split), batch_size=batch_size, shuffle_files=shuffle_files
  )
  return tfds.as_numpy(ds) if as_numpy else ds
