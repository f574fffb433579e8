"""Device mesh and how arrays are laid out on it.

Data parallel by default: the batch axis is split over every device of every host (mesh axis 'data');
parameters and optimiser state are replicated. Everything runs under one `jax.jit` over global arrays, so
`jnp.mean` over the batch axis (BatchNorm statistics, NT-Xent negatives, Sinkhorn sums) is a global
reduction and XLA inserts the collectives. The same code runs on one CPU, 8 fake CPU devices, a GPU and a
TPU slice; only the mesh differs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(spec: Sequence[tuple[str, int]] = ((DATA_AXIS, -1),), devices=None) -> Mesh:
    """Builds a Mesh from [(axis_name, size)], one size may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = [name for name, _ in spec]
    sizes = [int(size) for _, size in spec]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {list(spec)}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {list(spec)} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh {list(spec)} needs {int(np.prod(sizes))} devices, found {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, *, name: str = "config.batch_size") -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"{name}={batch_size} is not divisible by the {devices} devices of the mesh")
    if batch_size % jax.process_count():
        raise ValueError(f"{name}={batch_size} is not divisible by the {jax.process_count()} hosts")


def per_host(batch_size: int) -> int:
    return batch_size // jax.process_count()


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this host's slice of the batch into global arrays sharded over the data axis.

    `make_array_from_process_local_data` is the multi-host-correct way: each host contributes its own
    rows, and on a single host it is a plain sharded device_put.
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))
