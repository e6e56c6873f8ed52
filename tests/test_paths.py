"""The path layer on a local directory and on TensorFlow's in-memory `ram://` filesystem (the
stand-in for gs://, which goes through the same gfile calls)."""

import json
import os
import uuid

import numpy as np
import pytest

from qwen_image_rl import paths


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  return f"ram://bucket-{uuid.uuid4().hex}/run"


def test_text_and_json_round_trip_with_parents_created(root):
  path = paths.join(root, "results", "eval_3.json")
  assert not paths.exists(path)
  paths.write_json_atomic(path, {"step": 3, "score": 0.5})
  assert paths.read_json(path) == {"step": 3, "score": 0.5}
  assert paths.isfile(path) and not paths.isdir(path)
  assert paths.isdir(paths.join(root, "results"))
  assert paths.listdir(paths.join(root, "results")) == ["eval_3.json"]
  paths.write_text_atomic(path, "not json")
  with pytest.raises(ValueError, match="eval_3.json: not valid JSON"):
    paths.read_json(path)


def test_staged_dir_uploads_a_tree_of_binary_files(root):
  from safetensors.numpy import load, save_file

  weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  target = paths.join(root, "export", "pipeline")
  with paths.staged_dir(target) as local:
    assert os.path.isdir(local)
    os.makedirs(os.path.join(local, "transformer"))
    save_file(weights, os.path.join(local, "transformer", "model.safetensors"))
    with open(os.path.join(local, "model_index.json"), "w") as f:
      json.dump({"_class_name": "QwenImagePipeline"}, f)
  assert paths.listdir(target) == ["model_index.json", "transformer"]
  with paths.open_file(paths.join(target, "transformer", "model.safetensors"), "rb") as f:
    np.testing.assert_array_equal(load(f.read())["w"], weights["w"])
  if paths.is_url(target):
    assert not os.path.exists(local)  # the staging copy is gone


def test_results_config_and_prompt_files_reach_the_path(root):
  from configs import sft as sft_config
  from qwen_image_rl import metrics, runner
  from qwen_image_rl.data import prompt_files

  config = sft_config.get_config("tiny")
  runner.write_config(config, root)
  assert paths.read_json(paths.join(root, "config.json"))["trainer"] == "sft"
  # What MetricLogger.write_results calls (clu's TensorBoard writer takes gs:// but not ram://).
  metrics.write_json_atomic(
    paths.join(root, "results", "eval_2.json"), {"overall": np.float32(0.25)}
  )
  assert paths.read_json(paths.join(root, "results", "eval_2.json")) == {"overall": 0.25}
  prompts = paths.join(root, "curated.jsonl")
  records = [{"prompt": "a red circle", "category": "general"}]
  assert prompt_files.write_prompt_file(prompts, records) == 1
  assert [r.prompt for r in prompt_files.read_prompt_file(prompts)] == ["a red circle"]


def test_a_missing_remote_prompt_file_is_named():
  from qwen_image_rl.data import prompt_files

  path = f"ram://bucket-{uuid.uuid4().hex}/none.jsonl"
  with pytest.raises(prompt_files.PromptFileError, match="no such prompt file"):
    prompt_files.read_prompt_file(path)


def test_local_copy_downloads_a_url_tree_once(tmp_path):
  from safetensors.numpy import load_file, save_file

  weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  source = tmp_path / "vae"
  os.makedirs(source / "sub")
  save_file(weights, str(source / "sub" / "model.safetensors"))
  (source / "config.json").write_text(json.dumps({"z_dim": 4}))
  url = f"ram://bucket-{uuid.uuid4().hex}/vae"
  paths.upload_tree(str(source), url)

  assert paths.local_copy(str(source)) == str(source)  # local: itself
  local = paths.local_copy(url, cache_dir=str(tmp_path / "cache"))
  np.testing.assert_array_equal(
    load_file(os.path.join(local, "sub", "model.safetensors"))["w"], weights["w"]
  )
  # Downloaded once: a second call reads the cache even after the remote copy changes.
  paths.write_text_atomic(paths.join(url, "config.json"), "changed")
  again = paths.local_copy(url, cache_dir=str(tmp_path / "cache"))
  assert again == local and json.load(open(os.path.join(again, "config.json"))) == {"z_dim": 4}
  # No scratch directory is left behind.
  assert os.listdir(tmp_path / "cache" / "qwen_image_rl_remote") == [os.path.basename(local)]
  with pytest.raises(FileNotFoundError, match="no such directory"):
    paths.local_copy(url + "-missing", cache_dir=str(tmp_path / "cache"))


def test_pipeline_dirs_resolve_from_a_url_workdir(tmp_path, monkeypatch):
  from qwen_image_rl.config_lib import ConfigError
  from qwen_image_rl.pipelines.common import find_pipeline_dir
  from qwen_image_rl.rl.policy import resolve_pipeline_dir

  workdir = f"ram://bucket-{uuid.uuid4().hex}/run"
  paths.write_json_atomic(paths.join(workdir, "export", "pipeline", "model_index.json"), {"a": 1})
  monkeypatch.setenv("QWEN_IMAGE_RL_CACHE", str(tmp_path / "cache"))
  local = resolve_pipeline_dir(workdir)  # a workdir: its export/pipeline
  assert local.startswith(str(tmp_path / "cache"))
  assert json.load(open(os.path.join(local, "model_index.json"))) == {"a": 1}
  assert find_pipeline_dir(paths.join(workdir, "export", "pipeline")) == local
  assert find_pipeline_dir(workdir + "-other") is None
  with pytest.raises(ConfigError, match="no model_index.json there"):
    resolve_pipeline_dir(workdir + "-other")
