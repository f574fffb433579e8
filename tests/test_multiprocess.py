"""Multi-process training on one machine, started with the user's command (`MEDSSL_DISTRIBUTED=1` +
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, collectives through gloo): an uninterrupted
job of 4 processes x 2 fake CPU devices against one process with the same 8 devices, and a job of 2
processes x 4 devices, stopped by SIGTERM and rerun, against the 4-process job.

What a user relies on: the job trains on the global batch the single process would (each process reads
its own blocks of one shuffled stream), so its parameters equal the single-process run's; checkpoints
hold every process's data-iterator state; SIGTERM to one process stops every process at the same step
with a checkpoint and exit 0 (no hang), and rerunning resumes to the uninterrupted result; the export and
the logs are written once.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import background_runs
from helpers import final_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/micle.py:runlocal", "--config.data.phantom_patients=64", "--config.data.phantom_size=32",
        "--config.data.image_size=24", "--config.model.base_width=4", "--config.head.hidden_dim=16",
        "--config.head.out_dim=8", "--config.batch_size=16", "--config.optim.warmup_steps=2", "--config.log_every=1",
        "--config.probe.image_size=32",
        # A small learning rate: LARS at the :runlocal lr (2.0) amplifies float rounding step by step, which
        # would hide a real difference between the jobs behind a loose tolerance.
        "--config.optim.base_lr=0.1"]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(cache, devices):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               MEDSSL_JAX_CACHE=str(cache))
    return env


def _start_job(workdir, cache, *flags, processes=2):
    port = _free_port()
    jobs = []
    for rank in range(processes):
        env = _env(cache, 8 // processes)
        env.update(MEDSSL_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(rank))
        log = open(f"{workdir}.p{rank}.log", "w")
        jobs.append((subprocess.Popen([sys.executable, "-m", "medssl_jax.main", f"--workdir={workdir}", *TINY, *flags],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return jobs


def _wait(jobs, workdir):
    codes = []
    for process, log in jobs:
        try:
            codes.append(process.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for p, _ in jobs:
                p.kill()
            raise AssertionError(f"job in {workdir} hung (killed after {TIMEOUT_S} s)")
        finally:
            log.close()
    logs = [open(f"{workdir}.p{rank}.log").read() for rank in range(len(jobs))]
    assert codes == [0] * len(jobs), "\n---\n".join(log[-2000:] for log in logs)
    return logs


def _assert_same_state(a, b):
    """The model (params, BatchNorm statistics) and the loss of every step agree.

    Gloo's cross-process all-reduce adds in another order than the in-process one, so two jobs on the same
    batches agree to float rounding grown over the steps, not bitwise: measured (2026-12-01) up to 2e-4 of
    a tensor's largest value after 6 steps and 2e-3 after 20 (BatchNorm statistics), and up to 4e-5 in
    absolute value on the BN biases, which start at 0 and stay below 1e-2 in 10 steps; the same job with
    another seed differs by a median 1.2 of a tensor's largest value (109 of its 114 tensors fall outside
    this tolerance; BN scales barely move in 10 steps). The optimiser's momentum of small, cancelling
    gradients drifts most, ~1e-2 relative, so it is not compared.
    """
    (step_a, state_a), (step_b, state_b) = final_state(a), final_state(b)
    assert step_a == step_b
    model_a = dict(_leaves({k: state_a[k] for k in ("params", "batch_stats")}))
    model_b = dict(_leaves({k: state_b[k] for k in ("params", "batch_stats")}))
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        x, y = model_a[key].astype(np.float64), model_b[key].astype(np.float64)
        scale = float(np.max(np.abs(y), initial=0.0))
        assert np.max(np.abs(x - y), initial=0.0) <= 5e-3 * scale + 1e-4, (key, np.max(np.abs(x - y)), scale)
    losses = []
    for workdir in (a, b):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            losses.append([row["loss"] for row in map(json.loads, f) if "loss" in row])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _leaves(tree):
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield jax.tree_util.keystr(path), np.asarray(leaf)


# One recipe for every job here: long enough that a SIGTERM after step 3 lands mid-run.
FLAGS = ("--config.total_steps=10", "--config.checkpoint_every=5", "--config.monitor.every=5")


_background: dict = {}


def _start_background() -> list:
    """The uninterrupted 4-process job (4 x 2 devices) and the 1-process run (8 devices) it is compared with,
    started together in
    the background (tests/background_runs.py) from one phantom store made here first."""
    import tempfile

    from medssl_jax.data import phantoms

    root = tempfile.mkdtemp(prefix="medssl_jax_multiprocess_")
    cache = os.path.join(root, "cache")
    phantoms.ensure_phantom_store(cache, num_patients=64, image_size=32, seed=0)
    _background.update(root=root, cache=cache, job=os.path.join(root, "job"), single=os.path.join(root, "single"))
    jobs = _start_job(_background["job"], cache, *FLAGS, processes=4)
    _background["jobs"] = jobs
    single_log = open(_background["single"] + ".log", "w")
    single = subprocess.Popen([sys.executable, "-m", "medssl_jax.main", f"--workdir={_background['single']}", *TINY,
                               *FLAGS, "--config.probe.enabled=False"], cwd=REPO, env=_env(cache, 8),
                              stdout=single_log, stderr=subprocess.STDOUT)
    _background["single_process"] = (single, single_log)
    return [p for p, _ in jobs] + [single]


background_runs.register("multiprocess", "test_multiprocess.py", _start_background)


@pytest.fixture(scope="module")
def straight():
    """(workdir, the processes' logs, cache) of the uninterrupted 4-process job; its single-process twin in
    _background['single']."""
    import shutil

    background_runs.wait("multiprocess")
    logs = _wait(_background["jobs"], _background["job"])
    single, log = _background["single_process"]
    log.close()
    assert single.returncode == 0, open(_background["single"] + ".log").read()[-2000:]
    yield _background["job"], logs, _background["cache"]
    shutil.rmtree(_background["root"], ignore_errors=True)


def test_four_processes_train_like_one_with_the_same_devices(straight):
    job, logs, _ = straight
    _assert_same_state(job, _background["single"])
    # Process 0 logs and exports; the others stay quiet; every process's iterator state is checkpointed.
    assert "exported encoder" in logs[0] and "linear probe skipped: the linear probe runs on one host" in logs[0]
    assert all("step 10/10" not in log for log in logs[1:])
    assert sorted(os.listdir(os.path.join(job, "checkpoints", "10", "data"))) == [
        "commit_success.txt", *(f"process_{i}-of-4.json" for i in range(4))]
    rows = _rows(job)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # written once
    # The online monitor: computed over all 8 devices of the 4 processes, equal to the single process's
    # values (the random-init reference line is single-host only), written once.
    monitor = {r["step"]: r for r in rows if "monitor/rankme" in r}
    single = {r["step"]: r for r in _rows(_background["single"]) if "monitor/rankme" in r}
    assert sorted(monitor) == sorted(single) == [0, 5, 10]
    # Step 0 (the same weights): equal to float rounding; later steps carry the jobs' rounding differences
    # (see _assert_same_state), which can swap a near-tie among ~20 validation images' ranks.
    for step in monitor:
        for key in ("monitor/rankme", "monitor/embedding_std", "monitor/knn_auc", "monitor/probe_auc",
                    "monitor/alignment", "monitor/uniformity"):
            tolerance = dict(rtol=1e-4, atol=1e-5) if step == 0 else dict(rtol=1e-2, atol=0.02)
            np.testing.assert_allclose(monitor[step][key], single[step][key], **tolerance, err_msg=f"{key} {step}")
    assert os.path.isfile(os.path.join(job, "export", "config.json"))
    # Its checkpoint holds four processes' data positions: one process (this one) may not resume it.
    from medssl_jax import checkpoint

    checkpointer = checkpoint.TrainCheckpointer(os.path.join(job, "checkpoints"))
    try:
        with pytest.raises(checkpoint.CheckpointError, match="written by a job of 4 process.es. and this job has 1"):
            checkpointer.restore_latest(None, data_iterator=object())
    finally:
        checkpointer.close()


def test_sigterm_to_one_process_stops_all_at_one_step_and_the_rerun_resumes(straight, tmp_path):
    _, _, cache = straight
    job = str(tmp_path / "job")
    jobs = _start_job(job, cache, *FLAGS)
    deadline = time.time() + TIMEOUT_S
    while "step 3/" not in open(f"{job}.p0.log").read():  # training has started on both
        assert time.time() < deadline and all(p.poll() is None for p, _ in jobs), open(f"{job}.p0.log").read()
        time.sleep(0.1)
    jobs[1][0].send_signal(signal.SIGTERM)
    logs = _wait(jobs, job)  # every process exits 0, none hangs
    assert "SIGTERM: saved checkpoint at step" in logs[0], logs[0][-1500:]
    stopped = final_state(job)[0]
    assert 3 <= stopped < 10
    assert not os.path.exists(os.path.join(job, "export"))  # preempted: no export
    # Rerun the same command: it resumes and ends where the uninterrupted job ended.
    logs = _wait(_start_job(job, cache, *FLAGS), job)
    assert f"(step {stopped}, checksums verified)" in logs[0]
    _assert_same_state(job, straight[0])
