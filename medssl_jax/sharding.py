"""Device mesh and how arrays are laid out on it.

Data parallel by default: the batch axis is split over every device of every host (mesh axis 'data');
parameters and optimiser state are replicated. `config.sharding_rules` (big_vision style: a regex on a
state leaf's path -> how to lay it out) shards them instead, e.g. FSDP with
`config.mesh = (("data", -1), ("fsdp", 8))` and `config.sharding_rules = ((".*", "fsdp"),)`: every
parameter, its optimiser moments and the method's state (a DINO teacher, a queue) split over the 8 devices
of the 'fsdp' axis, gathered by XLA where a layer needs them. The batch is split over every mesh axis.

Everything runs under one `jax.jit` over global arrays, so
`jnp.mean` over the batch axis (BatchNorm statistics, NT-Xent negatives, Sinkhorn sums) is a global
reduction and XLA inserts the collectives. The same code runs on one CPU, 8 fake CPU devices, a GPU and a
TPU slice; only the mesh differs.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


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
    """Leading (batch) axis split over every mesh axis (with FSDP each device still gets its own
    examples), the rest replicated."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, *, name: str = "config.batch_size") -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"{name}={batch_size} is not divisible by the {devices} devices of the mesh")
    if batch_size % jax.process_count():
        raise ValueError(f"{name}={batch_size} is not divisible by the {jax.process_count()} hosts")


def check_single_host(what: str) -> None:
    """Refuses `what` in a multi-process job (one line naming it)."""
    if jax.process_count() > 1:
        raise ValueError(f"{what} runs on one host only (this job has {jax.process_count()} processes)")


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


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree's arrays on every process, a sharded array spread over several hosts (FSDP
    across processes) gathered first."""
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(host, tree)


def path_names(path) -> tuple[str, ...]:
    """The names along a jax tree path: dict keys, attribute names of optax states, sequence indices. The
    one naming of tree leaves here (optimiser masks, sharding rules, checkpoint and converter keys)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_path(path) -> str:
    """'params/encoder/Transformer/encoderblock_0/.../kernel' for a jax tree path (`path_names` joined by
    '/'), what `config.sharding_rules` match."""
    return "/".join(path_names(path))


def _fsdp_spec(shape: tuple, size: int) -> P:
    """big_vision's fsdp rule: the largest dimension that `size` divides goes over the 'fsdp' axis (the
    first of equal ones); a leaf with none (scalars, biases of odd size) stays replicated."""
    by_size = np.argsort([-d for d in shape], kind="stable")
    candidates = [i for i in by_size if shape[i] % size == 0 and shape[i] >= size]
    if not candidates:
        return P()
    spec = [None] * len(shape)
    spec[candidates[0]] = FSDP_AXIS
    return P(*spec)


def check_rules(rules, mesh: Mesh) -> list:
    """`config.sharding_rules` as [(compiled regex, layout)], each layout "replicate", "fsdp" or a tuple of
    mesh axis names / None per dimension (a PartitionSpec); one-line errors name the bad rule."""
    checked = []
    for i, rule in enumerate(rules or ()):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise ValueError(f"config.sharding_rules[{i}]={rule!r}: must be a (regex, layout) pair")
        pattern, layout = rule
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"config.sharding_rules[{i}] pattern {pattern!r} is not a regex: {error}") from None
        if layout == "fsdp":
            if FSDP_AXIS not in mesh.axis_names:
                raise ValueError(f"config.sharding_rules[{i}] uses 'fsdp' but config.mesh has no {FSDP_AXIS!r} axis "
                                 f"(axes {list(mesh.axis_names)}); e.g. config.mesh=(('data', -1), ('fsdp', 8))")
        elif layout != "replicate":
            if not isinstance(layout, (tuple, list)) or any(a is not None and a not in mesh.axis_names for a in layout):
                raise ValueError(f"config.sharding_rules[{i}] layout {layout!r} is not 'replicate', 'fsdp' or a tuple "
                                 f"of mesh axes {list(mesh.axis_names)} / None")
            layout = tuple(layout)
        checked.append((regex, layout))
    return checked


def state_shardings(tree: Any, mesh: Mesh, rules) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs): the layout of the first rule
    whose regex `re.search`es the leaf's path (`leaf_path`), replicated when none does. A rule that matches
    no leaf, or an explicit layout that does not fit a leaf's shape, is an error."""
    checked = check_rules(rules, mesh)
    used = [False] * len(checked)

    def layout_of(path, leaf):
        name, shape = leaf_path(path), tuple(getattr(leaf, "shape", ()))
        for i, (regex, layout) in enumerate(checked):
            if not regex.search(name):
                continue
            used[i] = True
            if layout == "replicate":
                return NamedSharding(mesh, P())
            if layout == "fsdp":
                return NamedSharding(mesh, _fsdp_spec(shape, mesh.shape[FSDP_AXIS]))
            if len(layout) > len(shape) or any(
                    a is not None and shape[d] % mesh.shape[a] for d, a in enumerate(layout)):
                raise ValueError(f"config.sharding_rules[{i}] layout {layout} does not fit {name} of shape {shape} on "
                                 f"mesh {dict(mesh.shape)}")
            return NamedSharding(mesh, P(*layout))
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(layout_of, tree)
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(f"config.sharding_rules pattern(s) {unused} match no parameter or state path (paths look "
                         f"like 'params/encoder/...' and 'opt_state/...')")
    return shardings
