"""The one train loop, for every pretraining method and for fine-tuning (methods/supervised.py, driven by
evaluate/finetune.py). Methods differ only in their module under methods/.

Read it top to bottom: mesh -> data -> model & optimiser -> state (fresh, initialised from an export, or
resumed) -> jitted step -> loop with logging, evaluation hook, online monitor (monitor.py: kNN / probe AUC,
RankMe, collapse), checkpoints and SIGTERM handling -> export.

Resume order (first that applies): this workdir's own latest checkpoint; `config.init` (an export or a
converted checkpoint, encoder weights only: two-stage pretraining); random initialisation.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medssl_jax import checkpoint, config_lib, logging_lib, methods, optim, sharding
from medssl_jax import monitor as monitor_lib
from medssl_jax.data import pipeline
from medssl_jax.data.sources import open_store
from medssl_jax.data.store import Store
from medssl_jax.models import input_norm


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, collapse); the message says why and what was kept."""


@dataclasses.dataclass
class PretrainResult:
    workdir: str
    export_dir: str | None
    steps_done: int
    total_steps: int
    preempted: bool
    variables: Any = None  # what method.export_variables gave (host arrays), when the run completed


@dataclasses.dataclass
class Evaluator:
    """An evaluation hook: `fn(state) -> {name: float}` every `every` steps and at the last step; the values
    are logged and written to metrics.jsonl / TensorBoard at that step (fine-tuning: validation AUC)."""

    every: int
    fn: Callable[[Any], dict]


def epoch_size(store: Store, spec: dict, split: str, ids: np.ndarray | None = None) -> int:
    """Elements per epoch: patients for the MICLe sampler, images otherwise (`ids`, when given)."""
    if ids is not None:
        return len(ids)
    if spec["sampler"] == "micle":
        return len(store.groups(split))
    return len(store.ids(split))


def example_batch(store: Store, spec: dict, *, split: str, batch_size: int, ids=None) -> dict[str, np.ndarray]:
    """A zero batch with the pipeline's shapes, to build the model without consuming the iterator."""
    channels = store.channels(store.ids(split) if ids is None else ids)
    batch = {
        crop["name"]: np.zeros((batch_size, crop["num"], crop["size"], crop["size"], channels), np.uint16)
        for crop in spec["crops"]
    }
    if "labels" in spec.get("fields", ()):
        batch["labels"] = np.zeros((batch_size, 2, len(store.label_names)), np.float32)
    return batch


def views_per_element(spec: dict) -> int:
    return sum(int(crop["num"]) for crop in spec["crops"])


class _SigtermFlag:
    """Turns SIGTERM (preemption, `kill`, scheduler time limit) into a flag the loop polls."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners): no handler then
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    """`flag` of this process, or of any process of a multi-process job (a host-level all-gather)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _last_good(checkpointer) -> str:
    """'step N' of the newest checkpoint that verifies (after the pending save is finalised), and closes
    the checkpointer: the run is about to stop."""
    step = checkpointer.latest_intact_step()
    checkpointer.close()
    return f"step {step}" if step is not None else "none (no verified checkpoint yet)"


def _first_nonfinite(metrics: dict) -> str | None:
    for name in ("loss", "grad_norm"):
        if name in metrics and not math.isfinite(float(metrics[name])):
            return f"{name}={float(metrics[name])}"
    return None


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step; shared by pretrain() and the benchmark."""

    method: Any
    mesh: Any
    store: Store
    spec: dict
    total_steps: int
    model: Any
    tx: Any
    data_iter: Any
    example: dict
    init_state: Any  # jitted: (global example batch, init_inputs) -> fresh train state
    init_inputs: dict  # the method's init_inputs(config), replicated
    init_optimizer: Any  # jitted: (params, init_inputs) -> fresh optimiser state
    abstract_state: Any
    train_step: Any  # jitted: (state, global batch) -> (state, metrics)

    batch_size: int

    @property
    def views_per_step(self) -> int:
        return views_per_element(self.spec) * self.batch_size

    def fresh_state(self):
        """The initial train state (before `config.init` replaces the encoder)."""
        return self.init_state(sharding.to_global(self.example, self.mesh), self.init_inputs)


def setup(config, *, store: Store | None = None, ids: np.ndarray | None = None) -> Setup:
    """Mesh, data, model, optimiser and the jitted init/step functions for `config`. `store` (already open)
    replaces config.data's, `ids` the records of config.data.split (fine-tuning on a label fraction)."""
    method = methods.get(config.method)

    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    repl = sharding.replicated(mesh)

    # ---------------------------------------------------------------- data
    store = store or open_store(config.data)
    if ids is None:  # explicit ids come from an evaluation, which checked the size on its own splits
        config_lib.check_image_size(store, config.data.split, config.data.image_size, field="data.image_size")
    if config.probe.enabled:
        config_lib.check_image_size(store, config.data.split, config.probe.image_size, field="probe.image_size")
    spec = method.data_spec(config)
    elements = epoch_size(store, spec, config.data.split, ids)
    if elements < config.batch_size:
        where = "the given records" if ids is not None else f"split {config.data.split!r}"
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {elements} "
            f"{'patients' if spec['sampler'] == 'micle' else 'images'} of {where} in {store.path}"
        )
    # From here on every duration is in steps (total, warm-up, SwAV's queue start and freeze, ...).
    config = config_lib.resolve_durations(config, epoch_size=elements, batch_size=config.batch_size)
    total_steps = config.total_steps
    data_iter = pipeline.make_pretrain_iterator(
        store,
        spec=spec,
        batch_size_per_host=sharding.per_host(config.batch_size),
        seed=spec.get("seed", config.seed),
        split=config.data.split,
        num_workers=config.data.num_workers,
        ids=ids,
    )
    example = example_batch(store, spec, split=config.data.split, batch_size=mesh.devices.size, ids=ids)

    # ---------------------------------------------------------------- model & optimiser
    model = method.build(config)
    tx, schedule = method.make_optimizer(config, total_steps=total_steps, batch_size=config.batch_size)
    init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
    # Arguments of the compiled init, not constants in it: the runs of a transfer study differ only in them.
    init_inputs = jax.device_put(method.init_inputs(config), repl)

    def init_state(batch, inputs):
        variables, method_state = method.init(model, init_key, batch, config, inputs)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": method.init_optimizer(tx, params, inputs),
            "method_state": method_state,
        }

    key = _jitted_key(config, method, mesh, example)
    if key in _JITTED:
        _JITTED.move_to_end(key)
        jitted = _JITTED[key]
        return Setup(method=method, mesh=mesh, store=store, spec=spec, total_steps=total_steps, model=model, tx=tx,
                     data_iter=data_iter, example=example, init_inputs=init_inputs, batch_size=config.batch_size,
                     **jitted)

    abstract_state = jax.eval_shape(init_state, sharding.to_global(example, mesh), init_inputs)
    state_shardings = sharding.state_shardings(abstract_state, mesh, config.sharding_rules)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                                  state_shardings)

    # ---------------------------------------------------------------- update step
    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(step_key, step)  # a resumed run replays the same randomness

        def loss_of(params):
            return method.loss_fn(
                params, state["batch_stats"], state["method_state"], batch,
                model=model, rng=rng, step=step, config=config,
            )

        (loss, (batch_stats, method_state, metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state["params"]
        )
        grads = method.process_grads(grads, step=step, config=config)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params, method_state = method.after_update(params, method_state, step=step, config=config)
        # The loop owns "loss": it is what was differentiated, whatever the method logs beside it.
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": optim.lr_of(state["opt_state"], schedule, step)}
        new_state = {
            "step": step + 1,
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "method_state": method_state,
        }
        return new_state, metrics

    jitted = dict(
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        init_optimizer=jax.jit(functools.partial(method.init_optimizer, tx),
                               out_shardings=state_shardings["opt_state"]),
        abstract_state=abstract_state,
        # One step for data parallel and FSDP: the state's layout comes from config.sharding_rules and XLA
        # inserts the all-gathers / reduce-scatters a sharded parameter needs.
        train_step=jax.jit(
            train_step, donate_argnums=(0,), in_shardings=(state_shardings, sharding.data_sharding(mesh)),
            out_shardings=(state_shardings, repl),
        ),
    )
    if key is not None:
        _JITTED[key] = jitted
        while len(_JITTED) > _JITTED_MAX:
            _JITTED.popitem(last=False)
    return Setup(method=method, mesh=mesh, store=store, spec=spec, total_steps=total_steps, model=model, tx=tx,
                 data_iter=data_iter, example=example, init_inputs=init_inputs, batch_size=config.batch_size,
                 **jitted)


# The jitted init and step of this process's earlier setups, by everything their programs depend on
# (`_jitted_key`). The runs of a transfer study differ only in the fine-tuning method's runtime fields (lr,
# schedule, seed, pos_weight, LP-FT head): they reuse one traced init and step instead of tracing and lowering
# the same programs again, which took about a second of every fine-tuning run on a 2-core CPU.
_JITTED: collections.OrderedDict = collections.OrderedDict()
_JITTED_MAX = 8
# Read by the host side of the loop only: the resume source, log / checkpoint cadence, input workers.
_HOST_FIELDS = ("init", "log_every", "checkpoint_every", "keep_checkpoints", "data.num_workers", "data.cache_dir")


def _jitted_key(config, method, mesh, example) -> str | None:
    """The config without the method's runtime fields and the host-only ones, the mesh and the batch's shapes;
    None (no reuse) for a method without runtime fields (pretraining: one run per process)."""
    if not method.runtime_fields:
        return None
    tree = config.to_dict()
    for field in (*method.runtime_fields, *_HOST_FIELDS):
        *parents, leaf = field.split(".")
        node = tree
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    devices = [[d.id, d.platform] for d in mesh.devices.flat]
    shapes = {k: [list(v.shape), str(v.dtype)] for k, v in example.items()}
    return json.dumps([tree, list(mesh.axis_names), list(mesh.devices.shape), devices, shapes], sort_keys=True,
                      default=repr)


def pretrain(config, workdir: str, *, stop_after: int | None = None, store: Store | None = None,
             ids: np.ndarray | None = None, evaluator: Evaluator | None = None,
             export: bool = True) -> PretrainResult:
    """Runs (or resumes) training in `workdir`: pretraining, or fine-tuning with the 'supervised' method.
    `stop_after` ends this run early after that many steps, exactly like a preemption (checkpoint, no
    export); tests use it to interrupt and resume. `store`/`ids`: see `setup`. `evaluator` runs every
    `evaluator.every` steps and at the end; `export=False` returns the final variables without writing
    WORKDIR/export (fine-tuning writes its own)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    run = setup(config, store=store, ids=ids)
    method, mesh, store, spec, total_steps = run.method, run.mesh, run.store, run.spec, run.total_steps
    data_iter, train_step = run.data_iter, run.train_step

    # ---------------------------------------------------------------- state: resume / init / fresh
    checkpointer = checkpoint.TrainCheckpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    latest, state = checkpointer.restore_latest(run.abstract_state, data_iter, warn=logging_lib.log)
    if latest is not None:
        logging_lib.log(f"resumed from {checkpointer.step_dir(latest)} (step {latest}, checksums verified)")
    else:
        state = run.fresh_state()
        if config.init:
            state = _init_encoder_from(state, config.init, run)
            logging_lib.log(f"encoder initialised from {config.init}")
    start_step = int(jax.device_get(state["step"]))

    # ---------------------------------------------------------------- loop
    writer = logging_lib.MetricWriter(workdir, resume_step=start_step)
    progress = logging_lib.Progress(total_steps, items_per_step=run.views_per_step, start_step=start_step)
    logging_lib.log(
        f"{'fine-tuning' if config.method == 'supervised' else 'pretraining ' + config.method}: {total_steps} "
        f"steps of {config.batch_size} "
        f"{'patients' if spec['sampler'] == 'micle' else 'images'} x {views_per_element(spec)} views "
        f"on {mesh.devices.size} {jax.devices()[0].platform} device(s); "
        + (f"{len(ids)} given records" if ids is not None else
           f"split {config.data.split!r} ({len(store.ids(config.data.split))} images)")
        + f" of store {store.path} ({store.num_records} images)"
    )
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    loop_start = _now()
    watch = _Watch.start(config, run, workdir, writer, state, start_step=start_step)
    preempted = False
    step = start_step
    metrics = None
    with _SigtermFlag() as sigterm:
        while step < end_step:
            batch = sharding.to_global(next(data_iter), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            last = step == end_step
            # Read once: a signal arriving later in this step is handled next step. Every process of a job
            # must stop at the same step (the step and the save are collectives), so one process's SIGTERM
            # stops them all.
            stop = _any_process(sigterm.raised)
            want_log = step % config.log_every == 0 or last or stop
            want_save = step % config.checkpoint_every == 0 or last or stop
            want_eval = evaluator is not None and (step % evaluator.every == 0 or last)
            if want_log or want_save or want_eval:
                host_metrics = jax.device_get(metrics)
                bad = _first_nonfinite(host_metrics)
                if bad:
                    kept = _last_good(checkpointer)
                    raise TrainingError(
                        f"non-finite {bad} at step {step}; stopped without saving it — last good checkpoint: "
                        f"{kept} in {os.path.join(workdir, 'checkpoints')}"
                    )
                problem = method.check_health(host_metrics, step=step)
                if problem:
                    raise TrainingError(f"{problem}; last good checkpoint: {_last_good(checkpointer)} in "
                                        f"{os.path.join(workdir, 'checkpoints')}")
                if want_eval:  # after the checks: a diverged model is not evaluated
                    try:
                        values = {k: float(v) for k, v in evaluator.fn(state).items()}
                    except TrainingError as error:  # e.g. non-finite predictions: the model diverged
                        raise TrainingError(f"{error} at step {step}; last good checkpoint: "
                                            f"{_last_good(checkpointer)}") from None
                    writer.write(step, values)
                    logging_lib.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
                if want_log:
                    progress.update(step)
                    writer.write(step, {**host_metrics, f"{progress.unit}_per_s": progress.rate})
                    logging_lib.log(
                        progress.line(step, loss=float(host_metrics["loss"]), lr=float(host_metrics["lr"]))
                    )
            if watch and (step % watch.every == 0 or step == total_steps):
                collapsed = watch.observe(step, state)
                if collapsed and config.monitor.stop_on_collapse:
                    checkpointer.save(step, state, data_iter)
                    raise TrainingError(f"{collapsed}; stopped (monitor.stop_on_collapse) with a checkpoint at "
                                        f"step {step}: {_last_good(checkpointer)} in "
                                        f"{os.path.join(workdir, 'checkpoints')}")
            if want_save:
                checkpointer.save(step, state, data_iter)
            if stop:
                preempted = True
                logging_lib.log(f"SIGTERM: saved checkpoint at step {step}; exiting (rerun the command to resume)")
                break
    checkpointer.close()
    writer.close()
    if watch:
        watch.finish(elapsed=_now() - loop_start)
    if step < total_steps:
        return PretrainResult(workdir, None, step, total_steps, preempted=True)

    # ---------------------------------------------------------------- export
    export_dir = os.path.join(workdir, "export")
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    # The encoder's variables (DINO: its teacher's, which live in method_state).
    encoder = method.export_variables(sharding.to_host(variables), sharding.to_host(state["method_state"]))
    if not export:
        return PretrainResult(workdir, None, step, total_steps, preempted=preempted, variables=encoder)
    checkpoint.save_export(export_dir, encoder, _export_record(config, run, step))
    logging_lib.log(f"exported encoder to {export_dir}")
    return PretrainResult(workdir, export_dir, step, total_steps, preempted=preempted)


class _Watch:
    """The online monitor inside the loop (monitor.py): step 0 and every `every` steps, its values to
    metrics.jsonl / TensorBoard, collapse warnings, the best step (and its export), the curves at the end."""

    def __init__(self, config, run: Setup, workdir: str, writer):
        self.config, self.run, self.workdir, self.writer = config, run, workdir, writer
        self.every = monitor_lib.every(config, run.total_steps)
        self.monitor = monitor_lib.Monitor(config, method=run.method, model=run.model, mesh=run.mesh,
                                           store=run.store)
        self.seconds = 0.0
        self.evaluations = 0
        earlier = monitor_lib.best(monitor_lib.read_curves(workdir))  # a resumed run continues the record
        self.best = earlier[2] if earlier else -math.inf

    @classmethod
    def start(cls, config, run: Setup, workdir: str, writer, state, *, start_step: int):
        if config.method == "supervised" or monitor_lib.every(config, run.total_steps) == 0:
            return None
        watch = cls(config, run, workdir, writer)
        if start_step == 0:
            if config.monitor.random_reference:
                t = _now()
                reference = watch.monitor.score_random_init(_reference_cache(config))
                watch.seconds += _now() - t
                if reference:
                    writer.write(0, reference)
                    logging_lib.log("monitor, fair random-init encoder: " + _fmt(reference))
            watch.observe(0, state)
        return watch

    def observe(self, step: int, state) -> str | None:
        """Scores the current encoder; returns the collapse message, if any (already logged)."""
        jax.block_until_ready(state)  # the steps still queued on the device are training time, not the monitor's
        t = _now()
        values = self.monitor(state)
        seconds = _now() - t
        self.seconds += seconds
        self.evaluations += 1
        public = monitor_lib.public(values)
        self.writer.write(step, public)
        logging_lib.log(f"step {step}: " + _fmt(public) + f" ({seconds:.1f} s)")
        key = monitor_lib.PREFIX + ("knn_auc" if self.monitor.labelled else "rankme")
        if self.config.monitor.export_best and math.isfinite(values.get(key, math.nan)) and values[key] > self.best:
            self.best = values[key]
            self._export_best(step, state, key)
        if monitor_lib.PREFIX + "nonfinite_embeddings" in values:
            message = f"non-finite embeddings of the validation images at step {step}"
        elif step > 0:  # at step 0 the BatchNorm running statistics are their initial values, not the data's
            message = monitor_lib.collapse_message(values, step=step)
        else:
            message = None
        if message:
            logging_lib.log(f"warning: {message}")
        return message

    def _export_best(self, step: int, state, key: str) -> None:
        method = self.run.method
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        encoder = method.export_variables(sharding.to_host(variables), sharding.to_host(state["method_state"]))
        checkpoint.save_export(os.path.join(self.workdir, "export_best"), encoder,
                               _export_record(self.config, self.run, step, best={"metric": key, "step": step}))

    def finish(self, *, elapsed: float) -> None:
        curves = monitor_lib.read_curves(self.workdir)
        if jax.process_index() == 0:
            path = monitor_lib.plot(curves, self.workdir)
            if path:
                logging_lib.log(f"monitor curves: {path}")
        logging_lib.log(monitor_lib.summary(curves))
        total = max(elapsed, 1e-9)
        logging_lib.log(f"monitor: {self.evaluations} evaluations in this run took {self.seconds:.1f} s "
                        f"({100 * self.seconds / total:.1f} % of its {total:.0f} s)")


def _reference_cache(config) -> str:
    """Where the monitor's random-init reference is cached (it depends on the architecture and data only)."""
    from medssl_jax.data import phantoms

    return os.path.join(str(config.data.cache_dir or phantoms.default_cache_dir()), "monitor")


def _now() -> float:
    import time

    return time.perf_counter()


def _fmt(values: dict) -> str:
    return ", ".join(f"{k.replace(monitor_lib.PREFIX, '')} {v:.4g}" for k, v in values.items())


def _export_record(config, run: Setup, step: int, **extra) -> dict:
    """The export's config.json record (model, input, source)."""
    model = config.model.to_dict()
    if model.get("rope_rescale") is not None:
        # DINOv3's RoPE coordinate rescaling augments pretraining; an exported encoder is a plain one, like
        # the released DINOv3 checkpoints (a fine-tuning config may switch it on again).
        model["rope_rescale"] = None
    return {
        "model": model,
        "input": {"image_size": config.data.image_size,
                  "channels": int(run.example[run.spec["crops"][0]["name"]].shape[-1]),
                  "normalization": input_norm.recorded(config.model)},
        "source": {"method": config.method, "steps": step, "store": run.store.name, "init": config.init,
                   "split": config.data.split, "num_images": int(len(run.store.ids(config.data.split))), **extra},
        "train_config": config.to_dict(),  # the whole recipe, for the model card of an exported encoder
    }


def _init_encoder_from(state, directory: str, run: Setup):
    """Replaces the encoder weights by an export's (ImageNet/DINOv2 -> medical two-stage pretraining), laid
    out as the run's state (replicated or sharded by config.sharding_rules) whatever the export's source."""
    method, abstract_state = run.method, run.abstract_state
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    abstract_encoder = method.encoder_variables(
        {"params": abstract_state["params"], "batch_stats": abstract_state["batch_stats"]}
    )
    loaded = checkpoint.load_encoder_init(directory, abstract_encoder)
    variables = method.with_encoder_variables(variables, loaded)
    shardings = {k: jax.tree.map(lambda x: x.sharding, abstract_state[k]) for k in ("params", "batch_stats")}
    variables = jax.device_put(variables, shardings)
    return {
        **state,
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": run.init_optimizer(variables["params"], run.init_inputs),
    }
