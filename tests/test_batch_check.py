"""The mesh-axis-divides-batch check names the config field, the dropped axes and the fix, and
agrees with what batch_sharding actually does."""

import logging

import ml_collections
import pytest

from qwen_image_rl.parallel import DEFAULT_LOGICAL_AXIS_RULES, batch_sharding, make_mesh
from qwen_image_rl.parallel.batch_check import (
  BatchShardingError,
  batch_mesh_axes,
  check_batches,
  config_batches,
)

RULES = DEFAULT_LOGICAL_AXIS_RULES


def test_v6e_256_rollouts_replicated_32x_is_an_error():
  sizes = {"data": 32, "fsdp": 8, "tensor": 1}
  assert batch_mesh_axes(RULES) == ("fsdp", "data")
  with pytest.raises(BatchShardingError) as info:
    check_batches({"config.rl.rollouts_per_step": 96}, sizes, RULES)
  message = str(info.value)
  assert "config.rl.rollouts_per_step=96" in message and "product 256" in message
  assert "split 8 ways and replicated 32x over data=32" in message
  assert "multiple of 256 (e.g. 256)" in message and "config.mesh" in message
  assert check_batches({"config.rl.rollouts_per_step": 512}, sizes, RULES) == []


def test_message_matches_batch_sharding_on_8_devices(caplog):
  mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  with caplog.at_level(logging.WARNING):
    problems = check_batches(
      {"config.data.t2i_batch_size": 12, "config.eval.batch_size": 16}, mesh, RULES, mode="warn"
    )
  assert len(problems) == 1 and "config.data.t2i_batch_size=12" in problems[0]
  assert any("t2i_batch_size=12" in r.getMessage() for r in caplog.records)
  # batch_sharding keeps fsdp (4 divides 12) and drops data: 4-way split, 2x replicated.
  sharding = batch_sharding(mesh, (12, 3), RULES)
  assert sharding.shard_shape((12, 3)) == (3, 3)
  assert "split 4 ways and replicated 2x over data=2" in problems[0]
  assert "e.g. 16 or 8" in problems[0]


def test_config_fields_and_products():
  config = ml_collections.ConfigDict(dict(rl=dict(prompts_per_step=6, group_size=4)))
  batches = config_batches(config, ["rl.prompts_per_step*rl.group_size", "rl.group_size"])
  assert batches == {"config.rl.prompts_per_step * rl.group_size": 24, "config.rl.group_size": 4}
  assert check_batches(batches, {"data": 4}, RULES, mode="warn") == []
  with pytest.raises(BatchShardingError, match="config.rl.missing does not exist"):
    config_batches(config, ["rl.missing"])
  with pytest.raises(BatchShardingError, match="positive integer"):
    check_batches({"config.x": 0}, {"data": 4}, RULES)
  assert check_batches({"config.x": 3}, {"data": 4}, RULES, mode="off") == []
