"""The prepared GPU benchmark runs end to end on a CPU at tiny sizes (so the device run cannot fail on a
typo): every row in its own process, one table with the JAX/PyTorch ratio, suite.json with the versions.
The smoke run (about a minute of row processes) starts in the background when the session starts
(tests/background_runs.py)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

import background_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch")

# jax-simclr-r50 runs jax-simclr-vitb16's code (_simclr_config, jax_pretrain_row) with the ResNet that
# jax-swav-r50 and jax-features-r50 compile here, so it is left out (27 s of CPU compile); the PyTorch
# ResNet-50's torch.compile alone takes minutes on a CPU, so the smoke test builds it without compiling
# (below).
ROWS = "jax-simclr-vitb16,jax-swav-r50,jax-features-r50,torch-simclr-vitb16,host-pipeline"
_smoke: dict = {}


def _start_smoke() -> list:
    _smoke["out"] = tempfile.mkdtemp(prefix="medssl_jax_bench_smoke_")
    _smoke["log"] = open(os.path.join(_smoke["out"], "smoke.log"), "w")
    return [subprocess.Popen([sys.executable, "-m", "medssl_jax.bench_suite", "--smoke", f"--out={_smoke['out']}",
                              f"--rows={ROWS}"], cwd=REPO, stdout=_smoke["log"], stderr=subprocess.STDOUT)]


background_runs.register("bench-smoke", "test_bench_suite.py", _start_smoke)


@pytest.fixture
def smoke_run():
    (process,) = background_runs.wait("bench-smoke")
    _smoke["log"].close()
    yield process, pathlib.Path(_smoke["out"])
    shutil.rmtree(_smoke["out"], ignore_errors=True)


def test_smoke_suite_writes_the_table_and_every_row(smoke_run):
    process, tmp_path = smoke_run
    assert process.returncode == 0, (tmp_path / "smoke.log").read_text()[-4000:]
    rows = ROWS
    with open(tmp_path / "suite.json") as f:
        suite = json.load(f)
    assert set(suite["rows"]) == set(rows.split(","))
    assert all("error" not in row for row in suite["rows"].values())
    for name in ("jax-simclr-vitb16", "jax-swav-r50"):
        row = suite["rows"][name]
        assert row["step_only_views_per_s"] > 0 and row["end_to_end_views_per_s"] > 0 and row["flops_per_step"] > 0
    assert suite["rows"]["torch-simclr-vitb16"]["step_only_views_per_s"] > 0
    assert suite["rows"]["host-pipeline"]["cpu_ms_per_image"] > 0
    assert suite["versions"]["jax"] and suite["versions"]["torch"]
    table = (tmp_path / "table.md").read_text()
    assert "| jax-simclr-vitb16 |" in table and "x |" in table
    # The host-pipeline note says how many CPU cores one jax-simclr-r50 step needs; that row's numbers
    # have the same fields as the ViT row's, which stand in for them here.
    from medssl_jax import bench_suite

    with_r50 = {**suite["rows"], "jax-simclr-r50": suite["rows"]["jax-simclr-vitb16"]}
    assert "cores" in bench_suite.table(with_r50).split("| host-pipeline |")[1]


def test_torch_reference_resnet50_matches_torchvisions_layout():
    import torch

    from medssl_jax import bench_suite

    model, width = bench_suite._torch_resnet50()
    assert width == 2048
    # torchvision's ResNet-50 has 25,557,032 parameters; without fc (2,049,000) and with a 1-channel stem
    # (64 x 7 x 7 instead of 64 x 3 x 7 x 7): 25,557,032 - 2,049,000 - 6,272.
    assert sum(p.numel() for p in model.parameters()) == 23_501_760
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 2048)
