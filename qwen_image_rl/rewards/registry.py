"""Reward registry: configs name rewards, factories build them.

  @register_reward('aesthetics')
  class Aesthetics(RewardFn): ...

  reward = make_reward('aesthetics')               # factory(**kwargs)
  known_rewards()                                  # ['aesthetics', 'alignment', ...]

The built-in rewards (the tiny world's oracle adapters) register themselves on first use of
`make_reward` / `known_rewards`, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from qwen_image_rl.rewards.base import RewardFn

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}
_BUILTIN_MODULES = (
  'qwen_image_rl.rewards.oracle_rewards',
  'qwen_image_rl.judges.rewards',
  'qwen_image_rl.rewards.remote',
)


def register_reward(name: str):
  """Decorator: registers `factory(**kwargs) -> RewardFn` (a class or a function) as `name`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'reward name must be a non-empty string, got {name!r}')

  def decorator(factory):
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not factory:
      raise ValueError(
        f'reward {name!r} is already registered (by {_qualname(existing)}); pick another name.'
      )
    _REGISTRY[name] = factory
    return factory

  return decorator


def _qualname(factory) -> str:
  return f'{getattr(factory, "__module__", "?")}.{getattr(factory, "__qualname__", factory)}'


def _load_builtins() -> None:
  for module in _BUILTIN_MODULES:
    importlib.import_module(module)


def known_rewards() -> list[str]:
  """Sorted names of every registered reward."""
  _load_builtins()
  return sorted(_REGISTRY)


def make_reward(name: str, **kwargs) -> RewardFn:
  """Builds the reward registered as `name` with `kwargs`.

  Raises:
    ValueError: unknown name (listing the known ones), or the factory returned no reward.
  """
  _load_builtins()
  if name not in _REGISTRY:
    raise ValueError(f'unknown reward {name!r}; known rewards: {sorted(_REGISTRY)}')
  try:
    reward = _REGISTRY[name](**kwargs)
  except TypeError as e:
    raise ValueError(f'reward {name!r} rejected its arguments {sorted(kwargs)}: {e}') from e
  if not callable(reward) or not getattr(reward, 'names', None):
    raise ValueError(
      f'reward factory {name!r} returned {reward!r}, which is not a reward (needs '
      f'__call__ and non-empty `names`).'
    )
  return reward
