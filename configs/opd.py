"""On-policy distillation: one CFG-free student from the T2I and edit teachers (paper sec. 7).

  python -m qwen_image_rl.main --config=configs/opd.py:tiny --workdir=runs/demo/opd \
      --config.init_from=runs/demo/base/export/pipeline \
      --config.teachers.t2i=runs/demo/rl_t2i --config.teachers.edit=runs/demo/rl_edit

The student starts from the base and samples without CFG; each teacher is an RL run's exported
pipeline, queried with CFG. Deviation (cost): opd.num_train_steps > 0 trains K random states of
the N per iteration instead of all N (0 = all, the paper's sum). 'qwen_image' is the full-size
20B setup (bf16, FSDP, remat) for 32 chips (v5p-32), 'qwen_image_256' for 256 chips (v6e-256,
a batch of 256 prompts: one per chip); they need real weights. Fit and compiler-estimated speed:
README "Pods" (benchmarks/aot_train_steps.py).

Results and runtime: README "On-policy distillation".
"""

import ml_collections

from configs import common, grpo_t2i


def opd_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      t2i_fraction=0.5,  # probability that an iteration's batch is T2I (else edit) [U]
      route_block=1,  # consecutive iterations of one task (fewer teacher swaps)
      batch_size=16,  # prompts per iteration, all of one task
      num_steps=10,  # the student's ODE steps N (paper: 40, the base schedule)
      num_train_steps=0,  # states trained per iteration; 0 = all N (deviation when > 0)
      teacher_cfg_scale=4.0,  # [U]; the teachers were trained with CFG 4
      student_cfg_scale=1.0,  # evaluation: the student samples without CFG
      negative_prompt="",
      micro_batch_size=ml_collections.config_dict.placeholder(int),
      max_consecutive_nonfinite=3,
    )
  )


VARIANTS = ("tiny", "qwen_image", "qwen_image_256")


def get_config(arg: str = "tiny"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/opd.py: unknown variant {arg!r}; known: {list(VARIANTS)}")
  c = common.base()
  c.trainer = "opd"
  c.init_from = "runs/demo/base/export/pipeline"
  c.teachers = ml_collections.ConfigDict(
    dict(t2i="runs/demo/rl_t2i/export/pipeline", edit="runs/demo/rl_edit/export/pipeline")
  )
  c.total_steps = 150
  c.model = grpo_t2i.tiny_model()
  c.data = ml_collections.ConfigDict(
    dict(image_size=64, max_text_tokens=48, num_prompts=1024, prompt_file="")
  )
  c.opd = opd_section()
  c.optim.lr = 1e-4
  c.optim.grad_clip_norm = 1.0
  c.checkpoint.every = 25
  c.log.every = 5
  c.log.progress_every = 10
  c.eval = common.tiny_eval()
  c.eval.every = 0
  c.eval.at_start = False  # the base's numbers are the demo's base stage
  if arg.startswith("qwen_image"):
    c.init_from = "/ckpt/Qwen-Image"
    c.teachers.t2i = "/ckpt/Qwen-Image-RL-T2I"
    c.teachers.edit = "/ckpt/Qwen-Image-RL-Edit"
    c.model = grpo_t2i.qwen_image_model()
    c.mesh = common.mesh(data=-1, fsdp=8, tensor=1)
    c.data.image_size = 1024
    c.data.max_text_tokens = 512
    c.data.num_prompts = 4096
    c.opd.batch_size = 32
    c.opd.num_steps = 40  # the base schedule
    c.opd.num_train_steps = 8  # deviation for cost: 8 of the 40 states per iteration
    c.opd.micro_batch_size = 4
    c.opd.route_block = 4  # a 20B teacher swap (40 GB host -> HBM) every 4 iterations at most
    c.total_steps = 2000
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 50
    c.checkpoint.every = 50
    c.eval.every = 250
    c.eval.num_t2i = 0
    c.eval.num_edits = 0
  if arg == "qwen_image_256":
    # One prompt per chip: the batch axis must divide over all 256 chips (else replicated).
    c.mesh = common.mesh(data=-1, fsdp=256, tensor=1)
    c.opd.batch_size = 256
    c.opd.micro_batch_size = 256
    # The update holds every trained state's activations: at 8 states it needs 32.99 GiB per
    # chip of v6e's 32 (AOT, README "Pods"); 6 states need 24.60 GiB (23% headroom).
    c.opd.num_train_steps = 6
  return c
