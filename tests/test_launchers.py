"""The launchers cannot rot silently: they parse, their dry runs print the commands they would
run (parsed here), the config variants they name exist, and the per-host start / status / stop
scripts really start a detached process with one log per host and stop it again."""

import importlib
import os
import re
import subprocess
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
GKE = os.path.join(ROOT, "launch", "gke", "launch.sh")
SCRIPTS = [TPU_VM, GKE, os.path.join(ROOT, "launch", "gke", "entrypoint.sh")]


def _run(*args, env=None, check=True):
  out = subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def _steps(dry_run_output: str) -> dict[str, tuple[str, str]]:
  """{step name: (gcloud command line, the script every host runs)} of a tpu_vm.sh dry run."""
  steps = {}
  pattern = r"# step: (\w+)\n(.*?)--command=\"\$\(cat <<'REMOTE'\n(.*?)\nREMOTE\n\)\"\n"
  for name, command, script in re.findall(pattern, dry_run_output, re.S):
    steps[name] = (command, script)
  return steps


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_print_usage(script):
  _run("bash", "-n", script)
  out = _run("bash", script, check=False)
  assert out.returncode == 2 and "usage:" in out.stdout + out.stderr


def test_tpu_vm_dry_run_prints_every_host_step():
  head = _run("git", "rev-parse", "HEAD").stdout.strip()
  out = _run(
    TPU_VM,
    "--dry_run",
    "--zone=us-east5-a",
    "--repo=https://example.com/q.git",
    "--weights=gs://bucket/models/Qwen-Image",
    "my-v5p",
    "configs/grpo_t2i.py:qwen_image",
    "gs://bucket/runs/exp1",
    "--",
    "--config.total_steps=10",
  ).stdout
  _run("bash", "-n", "-c", out)  # the dry run is itself a runnable script
  steps = _steps(out)
  assert list(steps) == ["setup", "stage_weights", "start"]
  for command, script in steps.values():
    assert command.startswith(
      "gcloud compute tpus tpu-vm ssh my-v5p --worker=all --zone=us-east5-a"
    )
    _run("bash", "-n", "-c", script)
  setup = steps["setup"][1]
  assert "uv venv -q --python 3.11 .venv" in setup
  assert f"git checkout -q --detach {head}" in setup and f'= {head}' in setup
  assert (
    "gcloud storage rsync --recursive gs://bucket/models/Qwen-Image $HOME/weights/Qwen-Image"
  ) in steps["stage_weights"][1]
  start = steps["start"][1]
  assert "setsid nohup .venv/bin/python -m qwen_image_rl.main" in start
  assert "LOG=$HOME/logs/exp1-worker$W.log" in start
  for flag in (
    "--config=configs/grpo_t2i.py:qwen_image",
    "--workdir=gs://bucket/runs/exp1",
    "--config.distributed=always",
    "--config.init_from=$HOME/weights/Qwen-Image",
    "--config.total_steps=10",
  ):
    assert flag in start


@pytest.mark.parametrize(
  "args,message",
  [
    (["t", "configs/sft.py:qwen_image", "gs://b/r"], 'has no variant "qwen_image"'),
    (["t", "configs/nope.py", "gs://b/r"], "config file configs/nope.py not found"),
    (["--weights=/local", "t", "configs/sft.py:tiny", "gs://b/r"], "must be a gs:// path"),
    (["--action=restart", "t", "configs/sft.py:tiny", "gs://b/r"], "--action=restart"),
  ],
)
def test_tpu_vm_rejects_bad_arguments(args, message):
  out = _run(TPU_VM, "--dry_run", "--repo=r", *args, check=False)
  assert out.returncode == 2 and message in out.stderr


def test_named_config_variants_exist():
  """Every configs/<file>.py:<variant> in the launchers' text builds a config."""
  named = set()
  for path in SCRIPTS + [os.path.join(ROOT, "launch", "gke", "jobset.yaml")]:
    named |= set(re.findall(r"configs/(\w+)\.py:(\w+)", open(path).read()))
  assert ("grpo_t2i", "qwen_image") in named
  for module, variant in sorted(named):
    config = importlib.import_module(f"configs.{module}").get_config(variant)
    assert config.trainer


def test_start_status_stop_on_a_fake_host(tmp_path):
  """Run the host-side scripts for real: a fake checkout and a fake Python that records its
  arguments, HOME in a temp dir. The job must outlive the launching shell, log per worker, and
  stop by its pid file."""
  home, repo = tmp_path / "home", tmp_path / "home" / "qwen_image_rl"
  (repo / ".venv" / "bin").mkdir(parents=True)
  env = dict(
    os.environ,
    HOME=str(home),
    GIT_AUTHOR_NAME="t",
    GIT_AUTHOR_EMAIL="t@t",
    GIT_COMMITTER_NAME="t",
    GIT_COMMITTER_EMAIL="t@t",
  )
  fake = repo / ".venv" / "bin" / "python"
  fake.write_text('#!/bin/sh\necho "args: $*"\nexec sleep 60\n')
  fake.chmod(0o755)
  for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
    subprocess.run(cmd, cwd=repo, env=env, check=True)
  commit = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
  ).stdout.strip()
  scripts = {}
  for action in ("run", "status", "stop"):
    out = _run(
      TPU_VM,
      "--dry_run",
      "--repo=r",
      f"--commit={commit}",
      f"--action={action}",
      "tpu",
      "configs/grpo_t2i.py:tiny",
      "gs://b/runs/exp2",
    ).stdout
    scripts.update(_steps(out))
  started = _run("bash", "-c", scripts["start"][1], env=env).stdout
  assert "started pid" in started
  worker = re.search(r"worker (\S+): started", started).group(1)
  log = home / "logs" / f"exp2-worker{worker}.log"
  for _ in range(50):
    if log.exists() and log.read_text():
      break
    time.sleep(0.1)
  assert "--config=configs/grpo_t2i.py:tiny --workdir=gs://b/runs/exp2" in log.read_text()
  assert "running" in _run("bash", "-c", scripts["status"][1], env=env).stdout
  again = _run("bash", "-c", scripts["start"][1], env=env, check=False)
  assert again.returncode == 1 and "already running" in again.stderr
  pid = int((home / "logs" / "exp2.pid").read_text())
  _run("bash", "-c", scripts["stop"][1], env=env)
  for _ in range(50):
    if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode:
      break
    time.sleep(0.1)
  assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
  assert "stopped" in _run("bash", "-c", scripts["status"][1], env=env).stdout


def _jobset(*args):
  return yaml.safe_load(_run(GKE, "--dry_run", "--repo=https://example.com/q.git", *args).stdout)


def test_gke_jobset_manifest():
  head = _run("git", "rev-parse", "HEAD").stdout.strip()
  doc = _jobset(
    "--tpu=v6e-256",
    "--weights=gs://bkt/models/Qwen-Image",
    "grpo1",
    "configs/grpo_t2i.py:qwen_image",
    "gs://bkt/runs/grpo1",
    "--",
    "--config.total_steps=10",
  )
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  assert doc["kind"] == "JobSet" and job["parallelism"] == job["completions"] == 64
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
    "cloud.google.com/gke-tpu-topology": "16x16",
  }
  container = pod["containers"][0]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert f"git checkout -q --detach {head}" in container["args"][0]
  assert container["args"][2:] == [
    "configs/grpo_t2i.py:qwen_image",
    "gs://bkt/runs/grpo1",
    "--config.total_steps=10",
  ]
  assert pod["volumes"][0]["csi"]["volumeAttributes"] == {
    "bucketName": "bkt",
    "mountOptions": "implicit-dirs,only-dir=models/Qwen-Image",
  }
  assert container["env"] == [{"name": "WEIGHTS", "value": "/weights"}]
  bare = _jobset("--tpu=v5p-64", "tiny1", "configs/grpo_t2i.py:tiny", "gs://bkt/runs/t")
  bare_pod = bare["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert "volumes" not in bare_pod and "env" not in bare_pod["containers"][0]
  assert bare_pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4x4"


def test_gke_xpk_command_and_bad_arguments():
  out = _run(
    GKE,
    "--dry_run",
    "--mode=xpk",
    "--cluster=c1",
    "--tpu=v5p-64",
    "--weights=gs://bkt/m/Q",
    "grpo1",
    "configs/grpo_t2i.py:qwen_image",
    "gs://b/r",
  ).stdout
  assert out.startswith(
    "xpk workload create --cluster=c1 --workload=grpo1 --tpu-type=v5p-64 "
    "--num-slices=1 --base-docker-image=python:3.11 "
  )
  assert r"WEIGHTS=gs://bkt/m/Q\ bash\ launch/gke/entrypoint.sh" in out
  for args, message in [
    (["--tpu=v4-8"], "--tpu=v4-8"),
    (["--mode=xpk"], "needs --cluster"),
    (["--weights=gs://only-bucket"], "gs://BUCKET/PATH"),
  ]:
    bad = _run(
      GKE, "--dry_run", "--repo=r", *args, "n", "configs/sft.py:tiny", "gs://b/r", check=False
    )
    assert bad.returncode == 2 and message in bad.stderr
  bad = _run(
    GKE, "--dry_run", "--repo=r", "Bad_Name", "configs/sft.py:tiny", "gs://b/r", check=False
  )
  assert bad.returncode == 2 and "DNS label" in bad.stderr
