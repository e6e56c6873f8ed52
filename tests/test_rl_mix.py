"""The Mix-RL baseline (trainers/rl_mix.py): one GRPO policy on T2I and edit iterations."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import rl_mix as rl_mix_config  # noqa: E402


def small_mix(pipe_dir):
  c = rl_mix_config.get_config("tiny")
  c.init_from = pipe_dir
  c.total_steps = 4
  for task in ("t2i", "edit"):
    t = c.tasks[task]
    t.data.update(dict(image_size=32, num_prompts=8, max_text_tokens=48))
    t.rl.update(
      dict(
        group_size=2,
        prompts_per_step=2,
        rollout_chunks=1,
        num_steps=3,
        async_rewards=False,
        micro_batch_size=2,
      )
    )
    t.rl.timesteps.update(dict(num_train=1, first_m=2))
  c.mix.t2i_fraction = 0.5
  c.eval.update(
    dict(num_t2i=4, num_edits=2, image_size=32, num_steps=2, batch_size=4, max_text_tokens=48)
  )
  c.checkpoint.update(dict(every=2, async_save=False))
  c.log.update(dict(every=1, images_every=0))
  return c


def test_budget_is_the_two_teachers_together():
  from configs import grpo_edit, grpo_t2i
  from qwen_image_rl import trainers

  c = rl_mix_config.get_config("tiny")
  t2i, edit = grpo_t2i.get_config("tiny"), grpo_edit.get_config("tiny")
  assert c.total_steps == t2i.total_steps + edit.total_steps
  assert round(c.total_steps * c.mix.t2i_fraction) == t2i.total_steps
  assert set(c.tasks.t2i.rewards.names) | set(c.tasks.edit.rewards.names) == {
    "alignment",
    "aesthetics",
    "portrait",
    "instruction_following",
    "identity",
    "preservation",
  }
  assert trainers.validate(c).name == "rl_mix"
  c.mix.t2i_fraction = 1.0
  with pytest.raises(Exception, match="mix.t2i_fraction=1.0"):
    trainers.validate(c)
  c = rl_mix_config.get_config("tiny")
  c.tasks.edit.rl.group_size = 0
  with pytest.raises(Exception, match="config.tasks.edit"):
    trainers.validate(c)


@pytest.mark.torch
def test_rl_mix_trains_both_tasks_and_exports(tmp_path, capsys, monkeypatch):
  from qwen_image_rl import main
  from qwen_image_rl.rl import iteration, routing
  from tests import tiny_reference

  loads = []
  load_base = iteration.load_base
  monkeypatch.setattr(iteration, "load_base", lambda c: loads.append(c) or load_base(c))

  _, pipe_dir = tiny_reference.build_t2i(str(tmp_path / "pipe"))
  c = small_mix(pipe_dir)
  tasks = [routing.route_task(c.seed, it, 0.5) for it in range(4)]
  results = main.run(c, str(tmp_path / "mix"))
  out = capsys.readouterr().out
  for it, task in enumerate(tasks):
    assert f"[{task}] iteration {it + 1}:" in out, out[-3000:]
  assert "reward instruction_following" in out and "reward alignment" in out
  assert "t2i" in results and "edit" in results
  assert os.path.isfile(tmp_path / "mix" / "export" / "pipeline" / "model_index.json")
  assert len(loads) == 1  # both tasks share one copy of the base
