"""notebooks/reload_export.ipynb runs end to end (a fresh kernel, as a user would) on a tiny export."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax import checkpoint, models
from medssl_jax.data import phantoms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "reload_export.ipynb")


def test_reload_export_notebook_runs_and_probes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    model = {"name": "resnet", "depth": 18, "width": 1, "base_width": 4}
    encoder = models.build_encoder({**model, "dtype": "float32"})
    variables = jax.jit(lambda k: encoder.init(k, jnp.zeros((1, 32, 32, 1)), train=False))(jax.random.PRNGKey(0))
    # Weights away from the initialisation (whose zero-gamma blocks make all images look alike), so that
    # the nearest neighbours are well separated and the PyTorch cell can compare them exactly.
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: (np.abs(rng.normal(size=x.shape)) + 0.5 if jax.tree_util.keystr(path).endswith("['var']")
                         else rng.normal(scale=0.3, size=x.shape)).astype(np.float32), variables)
    export = checkpoint.save_export(str(tmp_path / "export"), jax.device_get(variables),
                                    {"model": model, "source": {"method": "micle"}})
    store = phantoms.ensure_phantom_store(str(tmp_path / "cache"), num_patients=64, image_size=32, seed=0)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    cell.source = f"EXPORT = {export!r}\nSTORE = {str(store)!r}\nSPLIT = 'test'\nNUM_IMAGES = 60\nSEED = 0"
    env_free = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as in Colab
    # The package importable, as after `pip install .`; torch_shim imports torchvision next to CPU torch
    # (tests/torchvision_ops.py says why) for the PyTorch cell.
    env_free["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests", "torch_shim")])
    client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env_free)
        client.execute()  # raises CellExecutionError naming the cell on any error
    finally:
        os.environ.clear()
        os.environ.update(old)
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert re.search(r"features \(\d+, 32\)", outputs)  # ResNet-18 at base width 4: 32 features per image
    assert "test AUC" in outputs and outputs.count("AUC") + outputs.count("one class only") >= len(phantoms.LABEL_NAMES)
    try:
        import torch  # noqa: F401
        import torchvision_ops

        torchvision_ops.import_torchvision()
        has_torch = True
    except ImportError:
        has_torch = False
    if has_torch:  # the PyTorch cell: the same features and the same neighbours
        difference = float(re.search(r"max relative difference to JAX's (\S+)", outputs).group(1))
        assert difference <= 1e-5
        assert re.search(r"for 4 of 4", outputs)
    else:
        assert "skipping the PyTorch comparison" in outputs
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the nearest-neighbour grid and the PCA map
