"""The prepared GPU benchmark runs end to end on a CPU at tiny sizes (so the device run cannot fail on a
typo): every row in its own process, one table with the JAX/PyTorch ratio, suite.json with the versions."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch")


def test_smoke_suite_writes_the_table_and_every_row(tmp_path):
    # jax-simclr-r50 runs jax-simclr-vitb16's code (_simclr_config, jax_pretrain_row) with the ResNet that
    # jax-swav-r50 and jax-features-r50 compile here, so it is left out (27 s of CPU compile); the PyTorch
    # ResNet-50's torch.compile alone takes minutes on a CPU, so the smoke test builds it without
    # compiling (below).
    rows = "jax-simclr-vitb16,jax-swav-r50,jax-features-r50,torch-simclr-vitb16,host-pipeline"
    out = subprocess.run([sys.executable, "-m", "medssl_jax.bench_suite", "--smoke", f"--out={tmp_path}",
                          f"--rows={rows}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
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
