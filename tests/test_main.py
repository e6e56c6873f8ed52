"""The entry point rejects bad input with one line naming the problem, before compiling."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from qwen_image_rl import config_lib, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(tmp_path, body: str) -> str:
  path = tmp_path / "cfg.py"
  path.write_text(
    textwrap.dedent(
      """
      import sys
      sys.path.insert(0, %r)
      from configs import common

      def get_config(arg=None):
        c = common.base()
      """
      % REPO
    )
    + textwrap.indent(textwrap.dedent(body), "  ")
    + "  return c\n"
  )
  return str(path)


def _main(*args, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run(
    [sys.executable, "-m", "qwen_image_rl.main", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )


def _one_error_line(proc) -> str:
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: "), lines[0]
  return lines[0]


def test_unknown_trainer(tmp_path):
  cfg = _write_config(tmp_path, "c.trainer = 'nope'\n")
  line = _one_error_line(_main(f"--config={cfg}", f"--workdir={tmp_path}/w"))
  assert "config.trainer='nope' is not a known trainer" in line
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_unknown_config_field_in_override(tmp_path):
  cfg = _write_config(tmp_path, "c.trainer = 'nope'\n")
  line = _one_error_line(
    _main(f"--config={cfg}", "--config.optim.lrr=1e-3", f"--workdir={tmp_path}/w")
  )
  assert "lrr" in line and 'Did you mean "lr"' in line


def test_wrongly_typed_override(tmp_path):
  cfg = _write_config(tmp_path, "c.trainer = 'nope'\n")
  line = _one_error_line(
    _main(f"--config={cfg}", "--config.optim.lr=fast", f"--workdir={tmp_path}/w")
  )
  assert "--config.optim.lr=fast" in line


def test_workdir_is_a_file(tmp_path):
  cfg = _write_config(tmp_path, "c.trainer = 'nope'\n")
  f = tmp_path / "afile"
  f.write_text("x")
  line = _one_error_line(_main(f"--config={cfg}", f"--workdir={f}"))
  assert f"--workdir={f} is a file" in line


def test_missing_config_file(tmp_path):
  line = _one_error_line(_main(f"--config={tmp_path}/nope.py", f"--workdir={tmp_path}/w"))
  assert "could not load the config file" in line


def test_missing_required_trainer_field():
  c = ml_collections.ConfigDict({"trainer": ml_collections.config_dict.placeholder(str)})
  with pytest.raises(config_lib.ConfigError, match="config.trainer is required"):
    trainers.validate(c)


def test_check_fields_names_the_field():
  c = ml_collections.ConfigDict(
    {"optim": {"lr": "1e-4", "steps": 3, "flag": True}, "rl": {"group_size": None}}
  )
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.lr='1e-4' has type str"):
    config_lib.check_fields(c, {"optim.lr": float})
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.flag=True has type bool"):
    config_lib.check_fields(c, {"optim.flag": int})
  with pytest.raises(config_lib.ConfigError, match=r"config.rl.group_size is required"):
    config_lib.check_fields(c, {"rl.group_size": int})
  with pytest.raises(config_lib.ConfigError, match=r"config.rl.clip is missing"):
    config_lib.check_fields(c, {"rl.clip": float})
  config_lib.check_fields(c, {"optim.steps": float})  # ints are fine where floats are asked


def test_help_lists_trainers():
  proc = _main("--help")  # absl exits with status 1 after printing help
  text = " ".join(proc.stdout.split())  # absl wraps the help text
  for name in ("vae:", "sft:"):
    assert name in text, text
