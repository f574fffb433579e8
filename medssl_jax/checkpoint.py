"""Checkpoints (Orbax) and exported encoders.

Two things live here, both on Orbax:

* Training checkpoints, `WORKDIR/checkpoints/<step>/`: the whole train state (params, BatchNorm
  statistics, optimiser state, method state such as a SwAV queue or a DINO teacher, step) plus the Grain
  iterator position, so a resumed run continues with the same data order. Saves are asynchronous; the
  manager keeps the last few. A checkpoint directory only becomes visible to `latest_step()` once Orbax
  has finalised it, so a crash or kill mid-save leaves the previous checkpoint usable.
  A checkpoint is trusted only after verification: once Orbax has finalised it, the size and sha256 of
  every file go to `<step>/medssl_checksums.json`; a restore first checks them (and then that the restore
  itself succeeds). A damaged checkpoint (bytes flipped, a file truncated or missing, no checksums because
  the run died before writing them) is moved to `WORKDIR/damaged_checkpoints/` with a one-line warning
  naming it, and the next older one is tried (`restore_latest`); "last good checkpoint" in messages is
  always one that verifies (`latest_intact_step`).

* Exports, `DIR/config.json` + `DIR/variables/`: an encoder alone (params and, for ResNets, batch
  statistics) with the model config needed to rebuild it. Pretraining writes one to `WORKDIR/export`;
  `python -m medssl_jax.convert` writes the same layout for DINOv2/timm/torchvision weights. Reloading
  needs orbax and the model module only::

      variables, config = checkpoint.load_export("RUN/export")
      model = models.build_encoder(config["model"])
      features, out = model.apply(variables, images, train=False)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from medssl_jax import jsonio, sharding

CHECKSUM_FILE = "medssl_checksums.json"
CHECKSUM_FORMAT = "medssl_jax.checkpoint_checksums"
EXPORT_FORMAT = "medssl_jax.export"
EXPORT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be used; the message names it."""


def _file_digests(directory: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `directory` except the checksum file."""
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == CHECKSUM_FILE:
                continue
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            digests[rel] = [os.path.getsize(path), sha.hexdigest()]
    return digests


def write_checksums(step_dir: str) -> None:
    """Records the size and sha256 of every file of a finalised checkpoint (atomically, file last)."""
    payload = {"format": CHECKSUM_FORMAT, "version": 1, "files": _file_digests(step_dir)}
    jsonio.write_json(os.path.join(step_dir, CHECKSUM_FILE), payload, indent=None, sort_keys=True, allow_nan=True)


def verify_checkpoint(step_dir: str) -> str | None:
    """None when every file of the checkpoint matches its recorded checksum, else what is wrong."""
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.isdir(step_dir):
        return "directory missing"
    try:
        with open(path) as f:
            recorded = json.load(f)
        files = recorded["files"] if recorded.get("format") == CHECKSUM_FORMAT else None
    except FileNotFoundError:
        return f"no {CHECKSUM_FILE} (the run stopped before the checkpoint was verified)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {CHECKSUM_FILE} ({error})"
    if not isinstance(files, dict):
        return f"{CHECKSUM_FILE} is not a checksum file"
    actual = _file_digests(step_dir)
    for rel, (size, digest) in sorted(files.items()):
        if rel not in actual:
            return f"{rel} is missing"
        if actual[rel][0] != size:
            return f"{rel} has {actual[rel][0]} bytes, {size} were written"
        if actual[rel][1] != digest:
            return f"{rel} does not match its checksum (changed since it was written)"
    extra = sorted(set(actual) - set(files))
    if extra:
        return f"{extra[0]} was not part of the checkpoint"
    return None


class TrainCheckpointer:
    """Saves and restores the train state together with the data iterator position (verified, see above)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if int(keep) < 1:
            raise CheckpointError(f"keep_checkpoints={keep}: must be >= 1 (0 would keep none, so nothing could "
                                  "resume)")
        self.directory = os.path.abspath(directory)
        self._pending: list[int] = []  # saved, checksums not written yet (the async save may still run)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_iterator=None) -> None:
        self._finalize_pending()
        # The state is replicated: hand Orbax one host copy. Saving the device arrays instead makes it
        # slice every array per replica (thousands of tiny dispatches with 8 devices); restoring into
        # the abstract state's shardings is unaffected.
        if all(getattr(x, "is_fully_replicated", True) for x in jax.tree.leaves(state)):
            state = jax.device_get(state)
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending.append(step)

    def _finalize_pending(self) -> None:
        """Waits for the running save, then writes the checksums of every finalised checkpoint."""
        if not self._pending:
            return
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._pending:
                if os.path.isdir(self.step_dir(step)):  # may already be rotated out by max_to_keep
                    write_checksums(self.step_dir(step))
        self._pending = []

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """Restores into `abstract_state`'s shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest(self, abstract_state: Any, data_iterator=None, *,
                       warn: Callable[[str], None] = print) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that verifies and restores; (None, None) if none does.

        Every damaged checkpoint met on the way is moved to WORKDIR/damaged_checkpoints/ with a one-line
        warning, so that the run continues from the older one and never meets the damaged one again. A
        checkpoint whose files all match their checksums but which does not restore into `abstract_state`
        was written by a different config (another model, method or optimiser): that is not damage, so
        nothing is moved and CheckpointError says so in one line.
        """
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            problem = verify_checkpoint(self.step_dir(step))
            _sync(f"verified {self.directory} {step}")  # every process has looked before one moves it
            if problem is None:
                _check_process_count(self.step_dir(step), data_iterator)
                try:
                    return step, self.restore(step, abstract_state, data_iterator)
                except Exception as error:  # noqa: BLE001 - the bytes are intact, so the state does not fit
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} is intact but does not fit this run's state "
                        f"(written by a different config: model, method or optimiser changed; "
                        f"{type(error).__name__}: {str(error).splitlines()[0][:120]}); resume with the config it "
                        "was written with, or use a new --workdir") from None
            moved = self._quarantine(step)
            warn(f"warning: checkpoint step {step} ({self.step_dir(step)}) is damaged: {problem}; moved to {moved}, "
                 "falling back to the previous checkpoint")
        if steps:
            warn(f"warning: NO intact checkpoint in {self.directory} (all {len(steps)} damaged, moved aside): "
                 "starting from scratch")
        return None, None

    def _quarantine(self, step: int) -> str:
        target_root = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:  # one process moves it (a multi-process job shares the workdir)
            os.makedirs(target_root, exist_ok=True)
            shutil.move(self.step_dir(step), target)
        _sync(f"quarantined {self.directory} {step}")
        self._manager.reload()
        return target

    def latest_intact_step(self) -> int | None:
        """The newest checkpoint whose files match their checksums (what "last good" may name)."""
        self._finalize_pending()
        for step in sorted(self.all_steps(), reverse=True):
            if verify_checkpoint(self.step_dir(step)) is None:
                return step
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._finalize_pending()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._finalize_pending()
        self._manager.close()


def _sync(name: str) -> None:
    """A barrier across the processes of a multi-process job (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"medssl_jax {name}")


def _check_process_count(step_dir: str, data_iterator) -> None:
    """The data iterator's state is saved per process (data/process_I-of-N.json): a checkpoint of an
    N-process job resumes only in an N-process job."""
    data_dir = os.path.join(step_dir, "data")
    if data_iterator is None or not os.path.isdir(data_dir):
        return
    counts = {int(m.group(1)) for f in os.listdir(data_dir) if (m := re.match(r"process_\d+-of-(\d+)\.json$", f))}
    if counts and counts != {jax.process_count()}:
        written = sorted(counts)[0]
        raise CheckpointError(f"checkpoint {step_dir} was written by a job of {written} process(es) and this job has "
                              f"{jax.process_count()}: the data iterator's position is saved per process, so resume "
                              f"with {written} process(es) (or use a new --workdir)")


def save_export(directory: str, variables: Any, config: dict) -> str:
    """Writes an encoder export: `config.json` (with at least a "model" entry) and `variables/`."""
    if "model" not in config:
        raise CheckpointError(f"export config for {directory} has no 'model' entry")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "variables")
    variables = sharding.to_host(variables)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, variables, force=True)
    # config.json last: its presence marks a complete export. One process writes it (a multi-process job
    # shares the workdir), and no process returns before it is there.
    if jax.process_index() == 0:
        payload = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **config}
        jsonio.write_json(os.path.join(directory, "config.json"), payload, indent=2, sort_keys=True,
                          default=_json_default, allow_nan=True)
    _sync(f"export {directory}")
    return directory


def load_export_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"export directory {directory} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a medssl_jax export (no config.json; incomplete or foreign)")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r} is not {EXPORT_FORMAT!r}")
    if config.get("version") != EXPORT_VERSION:
        raise CheckpointError(
            f"{path}: export version {config.get('version')} is not supported (expected {EXPORT_VERSION})"
        )
    return config


def load_export(directory: str, abstract_variables: Any = None) -> tuple[Any, dict]:
    """Loads an export; returns (variables as host arrays, config dict).

    With `abstract_variables` (e.g. from jax.eval_shape of the model's init) the variables are restored
    into those shapes/shardings and a mismatch is reported with the first differing keys.
    """
    config = load_export_config(directory)
    target = os.path.join(os.path.abspath(directory), "variables")
    with ocp.StandardCheckpointer() as checkpointer:
        if abstract_variables is None:
            variables = checkpointer.restore(target)
        else:
            stored = checkpointer.metadata(target)
            stored_tree = getattr(stored, "item_metadata", stored)
            check_tree_matches(stored_tree, abstract_variables, what=directory)
            variables = checkpointer.restore(target, abstract_variables)
    return variables, config


def load_encoder_init(directory: str, abstract_variables: Any) -> Any:
    """Loads an export's variables to initialise an encoder of the configured architecture.

    An RGB checkpoint (ImageNet, DINOv2) initialises a grayscale encoder by summing the first layer's
    kernel over its input channels, which gives the same response to a gray image replicated 3 times.
    Anything else that does not fit is an error listing the first mismatching keys.
    """
    variables, _ = load_export(directory)
    expected = {sharding.leaf_path(p): v for p, v in _flatten(abstract_variables)}
    adapted = {}
    for path, leaf in _flatten(variables):
        key = sharding.leaf_path(path)
        want = expected.get(key)
        if (
            want is not None
            and leaf.ndim == 4
            and want.shape[:2] == leaf.shape[:2]
            and want.shape[3] == leaf.shape[3]
            and want.shape[2] == 1
            and leaf.shape[2] == 3
        ):
            leaf = leaf.sum(axis=2, keepdims=True)
        adapted[key] = leaf
    check_tree_matches(adapted, expected, what=directory)
    return jax.tree_util.tree_map_with_path(
        lambda path, want: jax.numpy.asarray(adapted[sharding.leaf_path(path)], dtype=want.dtype), abstract_variables
    )


def check_tree_matches(loaded: Any, expected: Any, *, what: str, limit: int = 5) -> None:
    """Raises CheckpointError listing the first missing / unexpected / mis-shaped keys."""
    loaded_shapes = {sharding.leaf_path(p): tuple(getattr(v, "shape", ())) for p, v in _flatten(loaded)}
    expected_shapes = {sharding.leaf_path(p): tuple(getattr(v, "shape", ())) for p, v in _flatten(expected)}
    missing = sorted(set(expected_shapes) - set(loaded_shapes))
    unexpected = sorted(set(loaded_shapes) - set(expected_shapes))
    misshaped = sorted(
        k for k in set(expected_shapes) & set(loaded_shapes) if expected_shapes[k] != loaded_shapes[k]
    )
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing {missing[:limit]}" + (f" (+{len(missing) - limit} more)" if len(missing) > limit else ""))
    if unexpected:
        parts.append(
            f"unexpected {unexpected[:limit]}" + (f" (+{len(unexpected) - limit} more)" if len(unexpected) > limit else "")
        )
    if misshaped:
        parts.append(
            "mis-shaped "
            + ", ".join(f"{k}: {loaded_shapes[k]} vs expected {expected_shapes[k]}" for k in misshaped[:limit])
        )
    raise CheckpointError(f"{what} does not fit the chosen architecture: " + "; ".join(parts))


def _flatten(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
