"""Where a run's images come from: the store a config's `data` fields point at."""

from __future__ import annotations

from medssl_jax.data import phantoms
from medssl_jax.data.store import Store


def open_store(data_config) -> Store:
    """The store `config.data.store` names; the embedded phantom dataset (generated and cached on first
    use) when it is ''."""
    if data_config.store:
        return Store(data_config.store)
    path = phantoms.ensure_phantom_store(
        data_config.cache_dir or None,  # None: $MEDSSL_JAX_CACHE or ~/.cache/medssl_jax
        num_patients=data_config.phantom_patients,
        image_size=data_config.phantom_size,
        seed=data_config.phantom_seed,
    )
    return Store(path)
