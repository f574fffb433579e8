"""The online monitor: is the encoder learning, and at which step was it best? (`config.monitor`)

A self-supervised loss says little about the features, so every `monitor.every` steps of a pretraining run
(and at step 0) the current encoder, in eval mode, embeds a fixed, seeded subset of the store's
**validation** split (never test; a store without one: held-out train patients) and a fixed subset of the
train split as the memory bank, and the train loop logs:

  monitor/knn_auc       labelled stores: mean AUC of a weighted kNN on the memory bank (cosine similarity,
                        k = monitor.knn_k = 20 neighbours, vote weights exp(similarity / 0.07): DINO's kNN
                        evaluation, with each label's vote share as its score)
  monitor/probe_auc     labelled stores: mean AUC of a ridge probe on standardised features (scikit-learn's
                        RidgeCV: its strength chosen by leave-one-out on the memory bank, not on validation)
  monitor/rankme        effective rank of the validation embeddings (Garrido et al. 2023): exp of the entropy
                        of the normalised singular values; 1 when every image has the same embedding
  monitor/embedding_std per-dimension std of the L2-normalised embeddings, averaged over dimensions (lightly's
                        collapse signal); about 1/sqrt(D) when spread, 0 when collapsed
  monitor/alignment     mean squared distance between the L2-normalised projections of two augmented views of
                        an image (Wang & Isola 2020, alpha 2): lower = more invariant
  monitor/uniformity    log E exp(-2 ||z_i - z_j||^2) over pairs of images' projections: lower = more spread

The fair random-init encoder (standard init, every residual branch active, BatchNorm statistics recomputed
on the memory bank, as evaluate/encoders.py builds it for the linear probe) is scored the same way once per run, as the reference line.
Embeddings are the encoder's pooled features as exported (DINO: the teacher's); projections come from the
method's head (SimCLR/MICLe/SwAV's z, DINO's bottleneck). A collapse, RankMe or relative std under the
thresholds of `collapse_message`, is one warning line, and with monitor.stop_on_collapse the run saves a
checkpoint and stops. The curves end up in WORKDIR/monitor.png; WORKDIR/export_best holds the encoder of the
best monitor step with monitor.export_best.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from medssl_jax import augment, jsonio, logging_lib, models, sharding
from medssl_jax.data import pipeline
from medssl_jax.data.store import Store
from medssl_jax.evaluate import encoders
from medssl_jax.evaluate import features as features_lib
from medssl_jax.evaluate import metrics
from medssl_jax.evaluate import splits as splits_lib

PREFIX = "monitor/"
KNN_TEMPERATURE = 0.07  # DINO's kNN evaluation
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-2, 5))  # RidgeCV's grid (leave-one-out on the memory bank)
# Collapse: every image (nearly) on one embedding. A random ResNet-18 at init has RankMe ~20 and a relative
# std ~0.3 on the phantoms (measured), so these only fire on a real collapse.
COLLAPSE_RANKME = 1.5
VIEW_IMAGES = 64  # validation images whose two augmented views give alignment / uniformity (2016 pairs)
COLLAPSE_RELATIVE_STD = 0.02  # embedding_std x sqrt(D)


def default_config() -> mlc.ConfigDict:
    m = mlc.ConfigDict()
    # Steps between evaluations; -1 = a sixth of the run (6 evaluations after step 0: under 5 % of a :runlocal
    # run's time on 2 CPU cores, measured in BENCHMARKS.md, where an eighth cost 5.4 %); 0 = off.
    m.every = -1
    m.num_val = 256  # validation images scored (a fixed, seeded subset)
    m.num_train = 512  # train images in the kNN memory bank / probe fit
    m.batch_size = 256  # images per forward pass
    m.knn_k = 20
    m.seed = 0
    m.random_reference = True  # also score a fair random-init encoder once (the reference line)
    m.stop_on_collapse = False  # save a checkpoint and stop when the embeddings collapse
    m.export_best = False  # also export the encoder of the best monitor step to WORKDIR/export_best
    return m


def validate(config) -> None:
    m = config.monitor
    for field in ("num_val", "num_train", "batch_size", "knn_k"):
        if not (isinstance(m[field], int) and m[field] > 0):
            raise ValueError(f"config.monitor.{field}={m[field]!r}: must be an integer > 0")
    if not (m.every == -1 or m.every >= 0):
        raise ValueError(f"config.monitor.every={m.every!r}: must be >= 0 (0 = off, -1 = a sixth of the run)")


def every(config, total_steps: int) -> int:
    """Steps between evaluations (0 = off)."""
    if config.monitor.every == -1:
        return max(1, total_steps // 6)
    return int(config.monitor.every)


# ------------------------------------------------------------------------------------------ metrics
# Pure functions over host arrays (the gathered embeddings: a few hundred rows, so NumPy in float64 costs
# milliseconds and compiles nothing), each with a reference test (tests/test_monitor.py).


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def rankme(*, embeddings, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp(-sum_k p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, over the
    singular values sigma of the [N, D] embedding matrix. Between 1 and min(N, D)."""
    x = np.asarray(embeddings, np.float64)
    # Singular values as square roots of the smaller Gram matrix's eigenvalues: a LAPACK SVD of the [N, D]
    # matrix took ~1 s on 2 CPU cores busy with training (BLAS threads competing with XLA's), this ~1 ms.
    gram = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
    s = np.sqrt(np.maximum(np.linalg.eigvalsh(gram), 0.0))
    p = s / max(float(np.sum(s)), 1e-30) + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def embedding_std(*, embeddings) -> float:
    """Per-dimension standard deviation (ddof 1) of the L2-normalised embeddings, averaged over dimensions."""
    return float(np.mean(np.std(l2_normalize(embeddings), axis=0, ddof=1)))


def alignment(*, z1, z2, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment: E ||f(x) - f(y)||^alpha over positive pairs of L2-normalised projections."""
    return float(np.mean(np.linalg.norm(l2_normalize(z1) - l2_normalize(z2), axis=-1) ** alpha))


def uniformity(*, z, t: float = 2.0) -> float:
    """Wang & Isola's uniformity: log E exp(-t ||f(x) - f(y)||^2) over the distinct pairs of rows."""
    z = l2_normalize(z)
    sq = np.maximum(2.0 - 2.0 * z @ z.T, 0.0)[np.triu_indices(len(z), k=1)]  # ||a - b||^2 of unit vectors
    return float(np.log(np.mean(np.exp(-t * sq))))


def knn_scores(*, memory, memory_labels, queries, k: int, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Weighted kNN vote share per label, [Q, L]: the k most cosine-similar memory rows whose label is known
    (NaN labels are skipped per label), each voting with weight exp(similarity / temperature)."""
    similarity = l2_normalize(queries) @ l2_normalize(memory).T  # [Q, M]
    labels = np.asarray(memory_labels, np.float64)
    out = np.full((similarity.shape[0], labels.shape[1]), np.nan)
    for j in range(labels.shape[1]):
        known = np.flatnonzero(~np.isnan(labels[:, j]))
        if len(known) == 0:
            continue
        sims = similarity[:, known]
        kk = min(k, len(known))
        rows = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top = np.take_along_axis(sims, rows, axis=1)
        weights = np.exp((top - 1.0) / temperature)  # exp(s / T) up to a common factor: no overflow at small T
        out[:, j] = np.sum(weights * labels[known, j][rows], axis=1) / np.sum(weights, axis=1)
    return out


def ridge_scores(*, train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Ridge-probe decision values per label, [Q, L]: features standardised on `train`, one RidgeCV per label
    (its strength chosen by leave-one-out on the train rows with that label known)."""
    from sklearn.linear_model import RidgeCV

    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    xs, qs = (train - mean) / std, (queries - mean) / std
    both = [len(np.unique(train_labels[:, j])) == 2 for j in range(train_labels.shape[1])]
    if not np.isnan(train_labels).any() and all(both):  # one SVD for every label (leave-one-out per label)
        return RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(xs, train_labels).predict(qs).reshape(
            len(queries), -1).astype(np.float32)
    out = np.full((len(queries), train_labels.shape[1]), 0.5, np.float32)
    for j in range(train_labels.shape[1]):
        known = ~np.isnan(train_labels[:, j])
        if len(np.unique(train_labels[known, j])) < 2:
            continue
        out[:, j] = RidgeCV(alphas=RIDGE_ALPHAS).fit(xs[known], train_labels[known, j]).predict(qs)
    return out


def mean_auc(*, scores, labels) -> float:
    """Mean over labels of the ROC AUC (labels with both classes among the known values; NaN if none)."""
    aucs = [metrics.roc_auc(scores[known, j], labels[known, j])
            for j in range(labels.shape[1]) for known in [~np.isnan(labels[:, j]) & ~np.isnan(scores[:, j])]
            if len(np.unique(labels[known, j])) == 2]
    return float(np.mean(aucs)) if aucs else float("nan")


def collapse_message(values: dict, *, step: int) -> str | None:
    """One line when the validation embeddings have collapsed (RankMe or relative std under the thresholds)."""
    rank, std, dim = values.get(PREFIX + "rankme"), values.get(PREFIX + "embedding_std"), values.get("_dim")
    if rank is not None and rank < COLLAPSE_RANKME:
        return (f"collapse at step {step}: monitor/rankme={rank:.3f} < {COLLAPSE_RANKME} (every validation image "
                f"has nearly the same embedding)")
    if std is not None and dim and std * math.sqrt(dim) < COLLAPSE_RELATIVE_STD:
        return (f"collapse at step {step}: monitor/embedding_std={std:.3g} (x sqrt(D) = {std * math.sqrt(dim):.3g} "
                f"< {COLLAPSE_RELATIVE_STD}; spread embeddings give ~1/sqrt(D) = {1 / math.sqrt(dim):.3g})")
    return None


# ------------------------------------------------------------------------------------------ subsets


def _subset(ids: np.ndarray, n: int, *, seed: int, name: str) -> np.ndarray:
    """A fixed subset of `ids` (sorted): the same for every run with the same seed and store."""
    ids = np.asarray(ids, np.int64)
    if len(ids) <= n:
        return np.sort(ids)
    rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
    return np.sort(rng.choice(ids, size=n, replace=False))


def subsets(store: Store, config) -> tuple[np.ndarray, np.ndarray, str]:
    """(memory-bank ids from config.data.split, validation ids, where the validation ids come from).
    Never the test split: without a 'val' split, 20 % of the train patients are held out."""
    m = config.monitor
    train = store.ids(config.data.split)
    train = train[~np.isin(store.splits[train], ("val", "test"))]  # never val / test records, whatever data.split
    val = store.ids("val")
    source = "the store's 'val' split"
    if len(val) == 0:
        held = splits_lib.patient_split(np.asarray(store.patients)[train], fraction=0.2, seed=m.seed)
        train, val = train[~held], train[held]
        source = f"20 % of the {config.data.split!r} patients held out (the store has no 'val' split)"
    if len(val) < 2 or len(train) < 2:
        raise ValueError(f"config.monitor: store {store.path} has {len(train)} train and {len(val)} validation "
                         "images; the monitor needs at least 2 of each (set --config.monitor.every=0)")
    return (_subset(train, m.num_train, seed=m.seed, name="memory"), _subset(val, m.num_val, seed=m.seed, name="val"),
            source)


def _labelled(store: Store, ids: np.ndarray) -> bool:
    if not store.label_names or store.labels.size == 0:
        return False
    return bool(np.any(~np.isnan(store.labels[ids])))


def _two_views(store: Store, ids: np.ndarray, config, channels: int) -> np.ndarray:
    """[N, 2, S, S, C] uint16: two seeded random-resized crops (+ flips) of each image, the pretraining
    pipeline's host geometry; the device adds the method's photometric augmentation with a fixed key."""
    source = store.data_source()
    size, scale = config.data.image_size, tuple(config.data.crop_scale)
    out = np.zeros((len(ids), 2, size, size, channels), np.uint16)
    for row, record_id in enumerate(ids):
        record = source.decoded(int(record_id))
        image = record["image"]
        rng = np.random.default_rng([config.monitor.seed, int(record_id)])
        for v in range(2):
            box = pipeline.random_resized_crop_box(image.shape[0], image.shape[1], scale=scale,
                                                   ratio=(3 / 4, 4 / 3), rng=rng)
            view = pipeline.crop_resize_uint16(image, box, size, value_scale=pipeline.full_range_scale(record),
                                               flip=bool(rng.integers(2)))
            out[row, v] = view.reshape(size, size, -1)
    return out


# ------------------------------------------------------------------------------------------ the monitor


def projections_of(out: dict):
    """The method head's output the loss compares: z (SimCLR, MICLe, SwAV), DINO's bottleneck."""
    if "z" in out:
        return out["z"]
    if "bottleneck" in out.get("head", {}):
        return out["head"]["bottleneck"]
    raise KeyError(f"the model's outputs have no projection ('z' or head/bottleneck): {sorted(out)}")


def embed_fn(encoder):
    """Jitted (encoder variables, uint16 images [B, H, W, C]) -> pooled features [B, D], eval mode."""

    def embed(variables, images):
        features, _ = encoder.apply(variables, augment.to_unit(images), train=False)
        return features.reshape(features.shape[0], -1).astype(jnp.float32)

    return jax.jit(embed)


def project_fn(model, augment_config, seed: int):
    """Jitted (model variables, uint16 views [B, 2, H, W, C], chunk index) -> projections [B, 2, P]: the
    method's photometric augmentation with a key fixed per chunk (the same views at every evaluation)."""

    def project(variables, views, chunk):
        x = augment.augment_views(views, rng=jax.random.fold_in(jax.random.PRNGKey(seed), chunk), cfg=augment_config)
        b = x.shape[0]
        _, out = model.apply(variables, x.reshape(b * 2, *x.shape[2:]), train=False)
        return projections_of(out).reshape(b, 2, -1).astype(jnp.float32)

    return jax.jit(project)


class Monitor:
    """Built once per run (fixed subsets, images loaded once); `monitor(state)` -> {name: value}."""

    def __init__(self, config, *, method, model, mesh, store: Store):
        self.config, self.method, self.mesh, self.store = config, method, mesh, store
        memory, val, self.val_source = subsets(store, config)
        channels = store.channels(val)
        size, batch = config.data.image_size, config.monitor.batch_size
        self.memory_images, self.memory_labels = features_lib.load_images(store, memory, image_size=size, batch_size=batch)
        self.val_images, self.val_labels = features_lib.load_images(store, val, image_size=size, batch_size=batch)
        self.views = _two_views(store, val[:VIEW_IMAGES], config, channels)
        self.labelled = _labelled(store, memory) and _labelled(store, val)
        self.memory_ids, self.val_ids = memory, val
        devices = mesh.devices.size
        self.batch = max(devices, config.monitor.batch_size // devices * devices)
        self._embed = embed_fn(models.build_encoder({**config.model.to_dict(), "dtype": config.compute_dtype}))
        self._project = project_fn(model, config.augment, config.monitor.seed)
        capped = [f"monitor.{field}={config.monitor[field]} > the {n} available" for field, n in
                  (("num_val", len(val)), ("num_train", len(memory))) if config.monitor[field] > n]
        logging_lib.log(
            f"monitor: {len(val)} validation images ({self.val_source}), memory bank {len(memory)} "
            f"{config.data.split!r} images" + (f" ({'; '.join(capped)}: all of them)" if capped else "") + ", " + ("kNN (k " f"{config.monitor.knn_k}) and ridge-probe AUC, "
                                                   if self.labelled else "no labels: ")
            + "RankMe, embedding std, alignment/uniformity")

    def _apply(self, fn, variables, images: np.ndarray, *extra) -> np.ndarray:
        """fn over `images` in fixed-size chunks spread over the mesh (every process holds all images and
        contributes its rows), gathered back on every process in order."""
        n, outs = len(images), []
        procs, index = jax.process_count(), jax.process_index()
        per = self.batch // procs
        for chunk, start in enumerate(range(0, n, self.batch)):
            part = images[start:start + self.batch]
            rows = len(part)
            if rows < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - rows, *part.shape[1:]), part.dtype)])
            global_part = jax.make_array_from_process_local_data(sharding.data_sharding(self.mesh),
                                                                 part[index * per:(index + 1) * per])
            out = fn(variables, global_part, *([chunk] if extra else []))
            out = multihost_utils.process_allgather(out, tiled=True) if procs > 1 else jax.device_get(out)
            outs.append(np.asarray(out)[:rows])
        return np.concatenate(outs)

    def score(self, encoder_variables, model_variables=None, *, embed=None) -> dict:
        """The monitor's values for one encoder (and, with `model_variables`, the method's projections)."""
        embed = embed or self._embed
        memory = self._apply(embed, encoder_variables, self.memory_images)
        val = self._apply(embed, encoder_variables, self.val_images)
        if not (np.all(np.isfinite(memory)) and np.all(np.isfinite(val))):
            return {PREFIX + "nonfinite_embeddings": 1.0}
        out = {PREFIX + "rankme": rankme(embeddings=val), PREFIX + "embedding_std": embedding_std(embeddings=val),
               "_dim": val.shape[1]}
        if self.labelled:
            knn = knn_scores(memory=memory, memory_labels=self.memory_labels, queries=val, k=self.config.monitor.knn_k)
            ridge = ridge_scores(train=memory, train_labels=self.memory_labels, queries=val)
            for key, scores in (("knn_auc", knn), ("probe_auc", ridge)):
                out[PREFIX + key] = mean_auc(scores=scores, labels=self.val_labels)
        if model_variables is not None:
            z = self._apply(self._project, model_variables, self.views, True)
            out[PREFIX + "alignment"] = alignment(z1=z[:, 0], z2=z[:, 1])
            out[PREFIX + "uniformity"] = uniformity(z=z[:, 0])
        return out

    def __call__(self, state) -> dict:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        encoder = self.method.export_variables(variables, state["method_state"])
        return self.score(encoder, variables)

    def reference_key(self) -> str:
        """What the random-init reference depends on: architecture, store, subsets, image size, seeds."""
        parts = {"model": self.config.model.to_dict(), "store": str(self.store.path), "records": self.store.num_records,
                 "written": json.dumps(self.store.meta, sort_keys=True, default=str),
                 "memory": hashlib.sha256(self.memory_ids.tobytes()).hexdigest(),
                 "val": hashlib.sha256(self.val_ids.tobytes()).hexdigest(), "size": self.config.data.image_size,
                 "seed": self.config.seed, "k": self.config.monitor.knn_k,
                 "residual_inits": "both, the better per metric"}  # a cache of active branches only is not reused
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def score_random_init(self, cache_dir: str | None = None) -> dict:
        """kNN / probe AUC of the fair random-init encoder (the reference line), cached in `cache_dir` by
        `reference_key`; {} for an unlabelled store or a multi-process job (recomputing BatchNorm statistics
        runs on one host). A ResNet has two standard inits of its residual branches (every branch active, or
        every branch starting as its shortcut) and which gives the better random features depends on the
        data, so both are scored and each metric keeps the better one: the conservative reference, as the
        linear probe's random baseline keeps the better one on validation."""
        if not self.labelled or jax.process_count() > 1:
            return {}
        path = os.path.join(cache_dir, f"monitor_reference_{self.reference_key()}.json") if cache_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        model_config = {**self.config.model.to_dict(), "dtype": "float32"}
        variants = (False, True) if encoders.has_residual_init_choice(model_config) else (None,)
        out = {}
        for zero_init in variants:
            if zero_init is not None:
                model_config["zero_init_last_bn"] = zero_init
            values = self._score_random_encoder(model_config)
            for key in ("knn_auc", "probe_auc"):
                value = values.get(PREFIX + key)
                name = PREFIX + "random_init_" + key
                if value is not None and np.isfinite(value) and value > out.get(name, -np.inf):
                    out[name] = value
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            jsonio.write_json(path, out, indent=None, allow_nan=True)
        return out

    def _score_random_encoder(self, model_config: dict) -> dict:
        encoder = models.build_encoder(model_config)
        example = jnp.zeros((1, *self.val_images.shape[1:]), jnp.float32)
        variables = dict(encoder.init(jax.random.PRNGKey(self.config.seed), example, train=False))
        batch = min(self.batch, len(self.memory_ids)) // self.mesh.devices.size * self.mesh.devices.size
        if batch >= self.mesh.devices.size:
            variables, _ = features_lib.recalibrate_batch_stats(
                encoder, variables, self.store, self.memory_ids, image_size=self.config.data.image_size,
                batch_size=batch, mesh=self.mesh)
        return self.score(variables, embed=embed_fn(encoder))


def public(values: dict) -> dict:
    """The values that go to metrics.jsonl (no private entries)."""
    return {k: v for k, v in values.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------ after the run


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of the monitor rows of WORKDIR/metrics.jsonl."""
    curves: dict[str, list] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return curves
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key.startswith(PREFIX):
                    curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return curves


def selection_metric(curves: dict) -> str | None:
    """What 'best step' means: kNN AUC on a labelled store, else RankMe (Garrido et al.'s label-free choice)."""
    for key in (PREFIX + "knn_auc", PREFIX + "rankme"):
        if any(math.isfinite(v) for _, v in curves.get(key, [])):
            return key
    return None


def best(curves: dict) -> tuple[str, int, float] | None:
    key = selection_metric(curves)
    if key is None:
        return None
    finite = [(v, -s) for s, v in curves[key] if math.isfinite(v)]
    value, neg_step = max(finite)  # ties: the earliest step
    return key, -neg_step, value


def summary(curves: dict) -> str:
    """The run-end line: start / best / end of the selection metric and RankMe."""
    chosen = best(curves)
    if chosen is None:
        return "monitor: no values"
    key, step, value = chosen
    series = curves[key]
    line = (f"monitor: best {key} {value:.4f} at step {step} (start {series[0][1]:.4f} at step {series[0][0]}, "
            f"end {series[-1][1]:.4f} at step {series[-1][0]})")
    reference = curves.get(PREFIX + "random_init_knn_auc")
    if key.endswith("knn_auc") and reference:
        line += f"; fair random-init encoder {reference[-1][1]:.4f}"
    rank = curves.get(PREFIX + "rankme")
    if rank and key != PREFIX + "rankme":
        line += f"; rankme {rank[0][1]:.1f} -> {rank[-1][1]:.1f}"
    return line


def plot(curves: dict, workdir: str) -> str | None:
    """WORKDIR/monitor.png: one panel per metric against step; kNN/probe AUC with the random-init line."""
    panels = [k for k in ("knn_auc", "probe_auc", "rankme", "embedding_std", "alignment", "uniformity")
              if curves.get(PREFIX + k)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        steps, values = zip(*curves[PREFIX + name])
        ax.plot(steps, values, marker="o", ms=3, label="this run")
        reference = curves.get(PREFIX + "random_init_" + name)
        if reference:
            ax.axhline(reference[-1][1], color="grey", ls="--", label="random init")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(workdir, "monitor.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
