"""notebooks/reload_export.ipynb runs end to end (a fresh kernel, as a user would) on a tiny export."""

import os
import re

import jax
import jax.numpy as jnp
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
    export = checkpoint.save_export(str(tmp_path / "export"), jax.device_get(variables),
                                    {"model": model, "source": {"method": "micle"}})
    store = phantoms.ensure_phantom_store(str(tmp_path / "cache"), num_patients=64, image_size=32, seed=0)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    cell.source = f"EXPORT = {export!r}\nSTORE = {str(store)!r}\nSPLIT = 'test'\nNUM_IMAGES = 60\nSEED = 0"
    env_free = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as in Colab
    env_free["PYTHONPATH"] = REPO  # the package importable, as after `pip install .`
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
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the nearest-neighbour grid and the PCA map
