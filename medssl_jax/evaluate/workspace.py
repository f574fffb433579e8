"""What every evaluation run (linear probe, fine-tuning) opens before any work, checked up front: the
init, the device mesh against the batch, and a labelled store with train and test splits at the image
size the config asks for. The store is opened once here and handed on.
"""

from __future__ import annotations

import os

import numpy as np

from medssl_jax import config_lib, sharding
from medssl_jax.data import sources
from medssl_jax.data.store import Store
from medssl_jax.evaluate import encoders


def unlabelled_reason(store: Store, *, train: str, test: str) -> str | None:
    """Why `store` cannot be evaluated with labels on its `train` and `test` splits, or None."""
    if not store.label_names:
        return f"store {store.path} has no labels"
    labelled = ~np.all(np.isnan(store.labels), axis=1) if store.labels.size else np.zeros(len(store), bool)
    for role, split in (("train", train), ("test", test)):
        ids = store.ids(split)
        if len(ids) == 0:
            return f"store {store.path} has no {split!r} split (the {role} split)"
        if not labelled[ids].any():
            return f"the {split!r} split of store {store.path} has no labelled record"
    return None


def open_eval(config, workdir: str, *, store: Store | None = None):
    """(absolute workdir, mesh, store) of an evaluation run (probe or fine-tune), after the checks every
    evaluation makes before any work: the init, the batch against the mesh, the image size, and a labelled
    store with train and test splits. `store`, when the caller has it open, is config.data's store."""
    encoders.check_init(config)
    workdir = os.path.abspath(workdir)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    store = store or sources.open_store(config.data)
    config_lib.check_image_size(store, config.splits.test, config.image_size, field="image_size")
    problem = unlabelled_reason(store, train=config.splits.train, test=config.splits.test)
    if problem:
        raise ValueError(f"cannot evaluate: {problem}; evaluation needs a labelled store with train and test "
                         "splits (python -m medssl_jax.ingest --csv=... --labels=... --test-fraction=...)")
    return workdir, mesh, store
