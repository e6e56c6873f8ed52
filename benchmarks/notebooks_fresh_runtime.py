"""Every notebook top to bottom in a fresh Colab-like runtime, with the wall time of each.

  python benchmarks/notebooks_fresh_runtime.py [--workdir=/tmp/nb_fresh] [--python=python3.11] \
      [--notebooks=quickstart,timestep_cfg,...] [--full]

A Colab runtime has Jupyter but not this package. So: a new venv holding only ipykernel,
nbclient and nbformat; a clone of this checkout's HEAD as the "repository" the notebooks' install
cell clones and pip-installs (QWEN_IMAGE_RL_COLAB_INSTALL=1 forces that cell outside Colab);
copies of the notebooks in a directory outside any checkout, each executed in a fresh kernel of
the venv. Short form (QWEN_IMAGE_RL_NOTEBOOK_SHORT=1) unless --full. The first notebook's time
includes the clone and the install. Prints one line per notebook and exits non-zero if any
failed or printed no results line.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MARKER = "NOTEBOOK_RESULTS "  # notebook_lib.RESULTS_MARKER (not importable in the venv)

# Runs inside the fresh venv: executes one notebook, prints whether it finished and reported.
RUNNER = """
import sys, nbclient, nbformat
path, marker = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
client = nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                                 resources={"metadata": {"path": sys.argv[3]}})
try:
  client.execute()
except Exception as e:
  print(f"FAILED: {str(e)[-1500:]}")
  sys.exit(1)
text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
               if o.get("output_type") == "stream")
sys.exit(0 if any(line.startswith(marker) for line in text.splitlines()) else 2)
"""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/nb_fresh")
  p.add_argument("--python", default="python3.11", help="the runtime's interpreter")
  p.add_argument("--notebooks", default="", help="comma list; default all in notebooks/")
  p.add_argument("--full", action="store_true", help="the full form instead of the short one")
  args = p.parse_args(argv)

  names = (
    args.notebooks.split(",")
    if args.notebooks
    else sorted(
      os.path.basename(f)[:-6] for f in glob.glob(os.path.join(REPO, "notebooks", "*.ipynb"))
    )
  )
  shutil.rmtree(args.workdir, ignore_errors=True)
  venv, source, copies = (os.path.join(args.workdir, d) for d in ("venv", "source", "notebooks"))
  subprocess.run([args.python, "-m", "venv", venv], check=True)
  python = os.path.join(venv, "bin", "python")
  subprocess.run(
    [python, "-m", "pip", "install", "-q", "ipykernel", "nbclient", "nbformat"], check=True
  )
  subprocess.run(["git", "clone", "-q", REPO, source], check=True)
  os.makedirs(copies)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS")}
  env.update(
    PATH=os.path.join(venv, "bin") + os.pathsep + "/usr/bin:/bin",
    QWEN_IMAGE_RL_COLAB_INSTALL="1",
    QWEN_IMAGE_RL_REPO=source,
    QWEN_IMAGE_RL_CHECKOUT=os.path.join(args.workdir, "checkout"),
    QWEN_IMAGE_RL_NOTEBOOK_SHORT="0" if args.full else "1",
    QWEN_IMAGE_RL_NOTEBOOK_WORKDIR=os.path.join(args.workdir, "runs"),
  )
  failed = 0
  for name in names:
    path = shutil.copy(os.path.join(source, "notebooks", f"{name}.ipynb"), copies)
    start = time.time()
    run = subprocess.run(
      [python, "-c", RUNNER, path, RESULTS_MARKER, copies], env=env, capture_output=True, text=True
    )
    status = {0: "ok", 2: "no results line"}.get(run.returncode, run.stdout.strip()[-1500:])
    failed += run.returncode != 0
    print(f"{name}: {status} in {time.time() - start:.0f} s", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
