"""Trainers, one module per `config.trainer`; importing this package registers them all."""
from qwen_image_rl.trainers import vae  # noqa: F401
from qwen_image_rl.trainers import sft  # noqa: F401
from qwen_image_rl.trainers import grpo  # noqa: F401
from qwen_image_rl.trainers import curate  # noqa: F401
from qwen_image_rl.trainers import face_id  # noqa: F401
from qwen_image_rl.trainers import reward_sft  # noqa: F401
