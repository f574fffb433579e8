"""The pretraining runs of test_learning.py, a background group (tests/background_runs.py) that starts as
soon as pytest has collected them, so that they share the 2 CPU cores with the compile-bound rest of the
suite instead of running after it; test_learning's tests then wait for their run. Each run is the user's
command in its own process (XLA optimisations on, one CPU device, as a user gets), its output in files:
a pipe nobody reads yet would block it once full.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import background_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The small-run settings: 800 phantom patients at 48 px, 32 px crops, 300 steps.
PHANTOMS = {"num_patients": 800, "image_size": 48, "seed": 0}
SMALL_RUN = [f"--config.data.phantom_patients={PHANTOMS['num_patients']}",
             f"--config.data.phantom_size={PHANTOMS['image_size']}", "--config.data.image_size=32",
             "--config.probe.image_size=48", "--config.total_steps=300", "--config.seed=0"]
# name -> (config, extra overrides)
RUNS = {
    "simclr": ("configs/simclr.py:runlocal", ()),
    # Ghesu et al.'s SwAV + NT-Xent hybrid with its paper-scale objective (NT-Xent on SwAV's own embedding,
    # lambda 1), where both terms shape one embedding (see test_hybrid_learns).
    "hybrid": ("configs/hybrid.py:runlocal", ("--config.swav.local_image_size=16", "--config.optim.base_lr=2.0",
                                              "--config.hybrid.contrastive_head=shared",
                                              "--config.hybrid.contrastive_weight=1.0",
                                              "--config.monitor.every=150")),
}

_started: dict = {}
_root: list = []


def _start() -> list:
    """Starts both runs from one phantom store, generated here first (two processes making it at once
    could race)."""
    from medssl_jax.data import phantoms

    root = tempfile.mkdtemp(prefix="medssl_jax_learning_")
    _root.append(root)
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS", "JAX_COMPILATION_CACHE_DIR")}
    env["MEDSSL_JAX_CACHE"] = os.path.join(root, "cache")
    env["JAX_PLATFORMS"] = "cpu"
    phantoms.ensure_phantom_store(env["MEDSSL_JAX_CACHE"], **PHANTOMS)
    for name, (config, overrides) in RUNS.items():
        workdir = os.path.join(root, name)
        with open(f"{workdir}.out", "w") as out, open(f"{workdir}.err", "w") as err:
            _started[name] = (workdir, subprocess.Popen(
                [sys.executable, "-m", "medssl_jax.main", f"--config={config}", f"--workdir={workdir}",
                 *SMALL_RUN, *overrides], cwd=REPO, env=env, stdout=out, stderr=err))
    return [process for _, process in _started.values()]


background_runs.register("learning", "test_learning.py", _start)


def result(name: str) -> tuple[dict, str, str]:
    """Waits for run `name`: (eval/summary.json, the last line it printed, its workdir)."""
    background_runs.wait("learning")
    workdir, process = _started[name]
    with open(f"{workdir}.out") as f:
        stdout = f.read()
    with open(f"{workdir}.err") as f:
        stderr = f.read()
    assert process.returncode == 0, stderr[-3000:]
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        summary = json.load(f)
    return summary, stdout.strip().splitlines()[-1], workdir


def cleanup() -> None:
    """Removes the runs' files (end of the session)."""
    for root in _root:
        shutil.rmtree(root, ignore_errors=True)
