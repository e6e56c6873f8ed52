from qwen_image_rl.parallel.context import as_rules, sharding_context
from qwen_image_rl.parallel.mesh import make_mesh, maybe_initialize_distributed, resolve_mesh_shape
from qwen_image_rl.parallel.multihost import (
  barrier,
  gather_rows,
  host_to_global,
  is_primary,
  process_rows,
  to_host,
)
from qwen_image_rl.parallel.partitioning import (
  DEFAULT_LOGICAL_AXIS_RULES,
  MESH_AXES,
  batch_sharding,
  get_logical_axes,
  logical_sharding,
  logical_to_spec,
  replicated,
  shard_tree,
  tree_shardings,
)
