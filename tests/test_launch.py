"""The launch scripts, run with stand-in `gcloud`, `srun`, `python3` and venv executables on PATH that
record what they were asked to do: every worker gets the same command, arguments survive quoting, the
per-host set-up is idempotent, the training command runs with MEDSSL_DISTRIBUTED=1, and a missing or bad
argument fails with one line."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in executable (run by this Python, not by a `python3` found on PATH, which may be a stand-in
# itself): appends {"argv": [...], "cwd": ..., "env": {selected}} to $RECORD as one JSON line.
RECORDER = f"""#!{sys.executable}
import json, os, sys
keep = ("MEDSSL_DISTRIBUTED", "SLURM_SUBMIT_DIR")
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"name": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "cwd": os.getcwd(),
                         "env": {{k: os.environ[k] for k in keep if k in os.environ}}}}) + "\\n")
"""


def _stand_in(directory, name):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(RECORDER)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def _records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def bin_dir(tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    return directory


def _run(script, *args, bin_dir, record, cwd=REPO, extra_env=None):
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record),
           **(extra_env or {})}
    return subprocess.run(["bash", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_tpu_vm_copies_the_checkout_and_runs_one_command_on_every_worker(bin_dir, tmp_path):
    _stand_in(bin_dir, "gcloud")
    record = tmp_path / "calls.jsonl"
    result = _run("launch/tpu_vm.sh", "my-v4-32", "us-central2-b", "--config=configs/micle.py",
                  "--workdir=/mnt/shared/runs/micle r50", bin_dir=bin_dir, record=record)
    assert result.returncode == 0, result.stderr
    scp, ssh = _records(record)
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp["argv"] and "--zone=us-central2-b" in scp["argv"]
    assert REPO in scp["argv"] and "my-v4-32:~/medssl_jax" in scp["argv"]
    assert ssh["argv"][:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh["argv"]
    command = next(a for a in ssh["argv"] if a.startswith("--command="))[len("--command="):]
    # What every worker runs; the space in the workdir survives the remote shell.
    assert command == r"cd ~/medssl_jax && bash launch/run_host.sh tpu --config=configs/micle.py " \
                      r"--workdir=/mnt/shared/runs/micle\ r50"


@pytest.mark.parametrize("args", [(), ("my-tpu",)])
def test_tpu_vm_without_its_arguments_fails_in_one_line(bin_dir, tmp_path, args):
    _stand_in(bin_dir, "gcloud")
    result = _run("launch/tpu_vm.sh", *args, bin_dir=bin_dir, record=tmp_path / "calls.jsonl")
    assert result.returncode != 0 and "usage: tpu_vm.sh TPU_NAME ZONE ARGS" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not _records(tmp_path / "calls.jsonl")


def test_slurm_runs_the_per_host_script_once_per_node_from_the_submit_dir(bin_dir, tmp_path):
    _stand_in(bin_dir, "srun")
    record = tmp_path / "calls.jsonl"
    result = _run(os.path.join(REPO, "launch", "slurm.sbatch"), "--config=configs/micle.py", "--workdir=/shared/runs/micle",
                  bin_dir=bin_dir, record=record, cwd=str(tmp_path), extra_env={"SLURM_SUBMIT_DIR": REPO})
    assert result.returncode == 0, result.stderr
    (srun,) = _records(record)
    assert srun["argv"] == ["bash", "launch/run_host.sh", "gpu", "--config=configs/micle.py",
                            "--workdir=/shared/runs/micle"]
    assert srun["cwd"] == REPO
    with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
        directives = [line for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1\n" in directives and "#SBATCH --signal=TERM@120\n" in directives
    # Outside sbatch it refuses in one line.
    env = {k: v for k, v in os.environ.items() if k != "SLURM_SUBMIT_DIR"}
    outside = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=REPO, capture_output=True, text=True, env={
        **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record)}, timeout=60)
    assert outside.returncode != 0 and "run with sbatch from the repository root" in outside.stderr


@pytest.fixture
def host_checkout(tmp_path):
    """A copy of what run_host.sh needs: launch/run_host.sh and requirements.txt."""
    root = tmp_path / "checkout"
    (root / "launch").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "launch", "run_host.sh"), root / "launch" / "run_host.sh")
    shutil.copy(os.path.join(REPO, "requirements.txt"), root / "requirements.txt")
    return root


def test_run_host_sets_up_once_and_runs_the_command_with_distributed_on(bin_dir, tmp_path, host_checkout):
    record = tmp_path / "calls.jsonl"
    # A stand-in python3 whose `-m venv .venv` makes a venv of stand-ins (pip, python) and records itself.
    python3 = _stand_in(bin_dir, "python3")
    with open(python3, "a") as f:
        f.write("""
if sys.argv[1:3] == ["-m", "venv"]:
    import shutil, stat
    target = os.path.join(sys.argv[3], "bin")
    os.makedirs(target)
    for name in ("pip", "python"):
        shutil.copy(sys.argv[0], os.path.join(target, name))
""")
    script = str(host_checkout / "launch" / "run_host.sh")
    for _ in range(2):
        result = _run(script, "gpu", "--config=configs/micle.py", "--workdir=/w", bin_dir=bin_dir, record=record,
                      cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
    calls = [(c["name"], c["argv"]) for c in _records(record)]
    assert calls.count(("python3", ["-m", "venv", ".venv"])) == 1  # the second run reuses the venv
    assert calls.count(("pip", ["install", "-q", "-r", "requirements.txt"])) == 2
    assert calls.count(("pip", ["install", "-q", "-U", "jax[cuda13]"])) == 2
    runs = [c for c in _records(record) if c["name"] == "python"]
    assert [r["argv"] for r in runs] == [["-m", "medssl_jax.main", "--config=configs/micle.py", "--workdir=/w"]] * 2
    assert all(r["env"]["MEDSSL_DISTRIBUTED"] == "1" and r["cwd"] == str(host_checkout) for r in runs)
    bad = _run(script, "fpga", bin_dir=bin_dir, record=record, cwd=str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.strip() == "error: accelerator must be tpu or gpu, got 'fpga'"
