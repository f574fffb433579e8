"""Grain input pipelines over a store: SSL pretraining views (SimCLR pairs, MICLe, multi-crop) and eval.

Pretraining (`make_pretrain_iterator`)::

    element indices (one per image, or one per patient for MICLe) of the split
      -> seed -> shuffle (grain's order, data/shuffle.py) -> repeat forever (each epoch reshuffled)
      -> random_map(SampleViews): pick the image(s), decode, random-resized crop(s), flip, to uint16
      -> batch(batch_size_per_host) -> this host's batches [process_index::process_count]
      -> to_iter_dataset -> mp_prefetch (num_workers > 0)

The stream of per-host batches is one global stream dealt out to the hosts: global batch t is host 0's
batch t, then host 1's, ..., which are consecutive blocks of one shuffled sequence, so a job of any
number of processes sees exactly the global batches (elements, crops, order) of a single process with
the same global batch. MapDatasets are lazy: a host decodes only its own blocks. Every random choice
comes from the rng Grain derives from (seed, element position in that global sequence), never from
global state, so the stream is identical for any number of worker processes and a restored iterator
(`get_state`/`set_state`, or orbax via grain.checkpoint) continues with exactly the batches it would
have produced.

Batches (numpy, per host), one key per crop group of the spec:
    {"global": uint16 [B, 2, S, S, C], "local": uint16 [B, n, s, s, C], ...}
with C = channels of the stored images (1 for radiographs). Intensities are rescaled to the full uint16
range, value / (2**bits_stored - 1) * 65535, so stores of any bit depth look alike to the model.
Crop k of every group is taken from the element's image k % 2: for MICLe that is image A for even
and image B for odd crops (two distinct images of the patient when it has two or more); for plain
pairs both are the same image.

Eval (`make_eval_iterator`): no shuffling and no randomness, every record of the split exactly once,
centre square crop + resize to `image_size`. Batches
    {"image": uint16 [B, S, S, C], "labels": float32 [B, L] (NaN missing), "index": int32 [B] (record
     id, -1 for padding), "mask": bool [B]}
The last batch is padded (mask False) and every host yields the same number of batches, so
multi-host gathers line up.

Transforms run inside Grain worker processes, which are started with spawn: they are top-level
classes and use numpy/PIL only. Grain 0.2.18 itself imports jax in every worker (google/grain#820); each
worker pins jax to the CPU at start, so that on a GPU host no worker takes device memory.
The iterator state of an mp_prefetch iterator restores only into one with the same num_workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from medssl_jax.data.modality import modality_id
from medssl_jax.data.shuffle import EpochShuffle
from medssl_jax.data.store import Store

UINT16_MAX = 65535
DEFAULT_RATIO = (3 / 4, 4 / 3)
SAMPLERS = ("pairs", "micle")

def _labels(record):
    return record["labels"].astype(np.float32)


def _modality_id(record):
    return np.int32(modality_id(record["modality"]))


def _bits_stored(record):
    return np.int32(record["bits_stored"])


def _intensity_offset(record):
    return np.float32(record["intensity_offset"])


# Per-image fields a method can ask for with `"fields": [...]` in its data spec; each comes out as
# [B, 2, ...] in the batch, one entry per source image (crop k of a group comes from image k % 2).
RECORD_FIELDS = {
    "labels": _labels,
    "modality_id": _modality_id,
    "bits_stored": _bits_stored,
    "intensity_offset": _intensity_offset,
}


# ------------------------------------------------------------------------------------------ host ops

def full_range_scale(record: dict) -> float:
    """Factor that maps stored values to the full uint16 range: 65535 / (2**bits_stored - 1).

    For stores with an intensity offset (e.g. CT stored as HU + 1024) the stored value is kept and only
    scaled by its bit depth: the offset makes it non-negative, and windowing is a device-side choice.
    """
    return UINT16_MAX / float(2 ** int(record["bits_stored"]) - 1)


def random_resized_crop_box(height: int, width: int, *, scale: Sequence[float], ratio: Sequence[float],
                            rng: np.random.Generator, attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) covering a random area fraction in `scale` with aspect in `ratio`.

    The sampling is torchvision's RandomResizedCrop (itself SimCLR's sample_distorted_bounding_box
    without the object-cover constraint): area uniform, aspect log-uniform, retried; after `attempts`
    failures a centre crop with the aspect clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def center_square_box(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize_uint16(image: np.ndarray, box: tuple[int, int, int, int], size: int, *, value_scale: float,
                       flip: bool = False) -> np.ndarray:
    """Crops `box` from an (H, W) or (H, W, C) image, resizes to (size, size) bilinearly (antialiased
    when shrinking), optionally mirrors left-right, rescales intensities and returns uint16 (size, size, C).
    """
    top, left, crop_h, crop_w = box
    if image.ndim == 2:
        image = image[:, :, None]
    region = image[top:top + crop_h, left:left + crop_w]
    channels = []
    for c in range(region.shape[2]):
        # PIL's float mode keeps 16-bit values exact and its resize is fast C with proper filtering.
        plane = Image.fromarray(np.ascontiguousarray(region[:, :, c], dtype=np.float32))
        channels.append(np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR)))
    out = np.stack(channels, axis=-1)
    if flip:
        out = out[:, ::-1]
    out = np.rint(out * np.float32(value_scale))
    return np.clip(out, 0, UINT16_MAX).astype(np.uint16)


def validate_crops(crops: Sequence[dict]) -> list[dict]:
    """Checks a crops spec ([{name, num, size, scale[, ratio, flip]}]) and fills the defaults."""
    if not crops:
        raise ValueError("data spec 'crops' is empty: need at least one {name, num, size, scale} group")
    result, names = [], set()
    for crop in crops:
        missing = {"name", "num", "size", "scale"} - set(crop)
        if missing:
            raise ValueError(f"crop spec {crop!r} lacks {sorted(missing)}")
        if crop["name"] in names:
            raise ValueError(f"crop spec name {crop['name']!r} used twice")
        names.add(crop["name"])
        scale = tuple(float(s) for s in crop["scale"])
        ratio = tuple(float(r) for r in crop.get("ratio", DEFAULT_RATIO))
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop spec {crop['name']!r}: scale {scale} must satisfy 0 < lo <= hi <= 1")
        if int(crop["num"]) < 1 or int(crop["size"]) < 1:
            raise ValueError(f"crop spec {crop['name']!r}: num and size must be >= 1")
        result.append({"name": str(crop["name"]), "num": int(crop["num"]), "size": int(crop["size"]),
                       "scale": scale, "ratio": ratio, "flip": bool(crop.get("flip", True))})
    return result


class SampleViews(grain.transforms.RandomMap):
    """Element (an index into `groups`: one patient, or one image) -> the crop groups of the spec.

    `groups` is (offsets, record_ids) in CSR form: group g owns record_ids[offsets[g]:offsets[g+1]].
    Two flat arrays pickle to worker processes in one copy however many patients there are. A group
    with >= 2 images yields two distinct images (MICLe positives); with one image both come from it.
    """

    def __init__(self, source, groups: tuple[np.ndarray, np.ndarray], crops: Sequence[dict], *,
                 fields: Sequence[str] = (), with_record_ids: bool = False):
        self.source = source  # an ArrayRecordDataSource pickles without its open readers
        self.offsets, self.record_ids = groups
        self.crops = validate_crops(crops)
        unknown = sorted(set(fields) - set(RECORD_FIELDS))
        if unknown:
            raise ValueError(f"data spec fields {unknown} unknown; available: {sorted(RECORD_FIELDS)}")
        self.fields = tuple(fields)
        self.with_record_ids = with_record_ids

    def random_map(self, group: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids = self.record_ids[self.offsets[group]:self.offsets[group + 1]]
        if len(ids) >= 2:
            pair = rng.choice(ids, size=2, replace=False)
        else:
            pair = np.array([ids[0], ids[0]])
        if pair[0] == pair[1]:
            records = [self.source.decoded(int(pair[0]))] * 2
        else:
            raws = self.source.__getitems__([int(i) for i in pair])
            records = [self.source.decoded(int(i), raw) for i, raw in zip(pair, raws)]
        out = {}
        for crop in self.crops:
            views = []
            for k in range(crop["num"]):
                record = records[k % 2]
                image = record["image"]
                box = random_resized_crop_box(image.shape[0], image.shape[1], scale=crop["scale"],
                                              ratio=crop["ratio"], rng=rng)
                flip = crop["flip"] and bool(rng.integers(2))
                views.append(crop_resize_uint16(image, box, crop["size"],
                                                value_scale=full_range_scale(record), flip=flip))
            out[crop["name"]] = np.stack(views)
        for field in self.fields:
            out[field] = np.stack([RECORD_FIELDS[field](record) for record in records])
        if self.with_record_ids:
            out["record_ids"] = pair.astype(np.int32)
        return out


class LoadForEval(grain.transforms.Map):
    """Record id -> centre-cropped, resized image + labels; id -1 is padding (zeros, NaN labels, mask 0)."""

    def __init__(self, source, *, image_size: int, channels: int, num_labels: int):
        self.source = source
        self.image_size = image_size
        self.channels = channels
        self.num_labels = num_labels

    def map(self, record_id: int) -> dict[str, np.ndarray]:
        record_id = int(record_id)
        if record_id < 0:
            return {"image": np.zeros((self.image_size, self.image_size, self.channels), np.uint16),
                    "labels": np.full(self.num_labels, np.nan, np.float32),
                    "index": np.int32(-1), "mask": np.bool_(False)}
        record = self.source.decoded(record_id)
        image = record["image"]
        image = crop_resize_uint16(image, center_square_box(image.shape[0], image.shape[1]),
                                   self.image_size, value_scale=full_range_scale(record))
        return {"image": image, "labels": record["labels"].astype(np.float32),
                "index": np.int32(record_id), "mask": np.bool_(True)}


# ------------------------------------------------------------------------------------------ datasets

def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
    return process_index, process_count


def pretrain_groups(store: Store, *, sampler: str, split: str | None, process_index: int = 0,
                    process_count: int = 1, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The dataset elements in CSR form (offsets, record_ids): one group per patient of the split for
    'micle', one group per image for 'pairs' (of `ids` instead of the split when given: a label fraction);
    every process_count-th group from process_index (the pretraining pipeline takes all of them and deals
    out batches instead, see the module docstring)."""
    if ids is not None:
        if sampler != "pairs":
            raise ValueError(f"explicit record ids need the 'pairs' sampler, not {sampler!r}")
        record_ids = np.asarray(ids, np.int64)[process_index::process_count]
        return np.arange(len(record_ids) + 1, dtype=np.int64), record_ids
    if sampler == "micle":
        member_lists = list(store.groups(split).values())[process_index::process_count]
        lengths = np.array([len(m) for m in member_lists], np.int64)
        record_ids = (np.concatenate(member_lists).astype(np.int64) if member_lists
                      else np.zeros(0, np.int64))
    elif sampler == "pairs":
        record_ids = store.ids(split)[process_index::process_count]
        lengths = np.ones(len(record_ids), np.int64)
    else:
        raise ValueError(f"data spec sampler {sampler!r} unknown; use one of {SAMPLERS}")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, record_ids


def make_pretrain_dataset(store: Store, *, spec: dict, batch_size_per_host: int, seed: int,
                          split: str | None = "train", process_index: int | None = None,
                          process_count: int | None = None, with_record_ids: bool = False,
                          ids: np.ndarray | None = None) -> grain.MapDataset:
    """The infinite, batched pretraining MapDataset for this host (see the module docstring); `ids`
    replaces the split's records (fine-tuning on a label fraction)."""
    process_index, process_count = _host(process_index, process_count)
    sampler = spec.get("sampler", "pairs")
    offsets, record_ids = pretrain_groups(store, sampler=sampler, split=split, ids=ids)
    num_groups = len(offsets) - 1
    unit = "patients" if sampler == "micle" else "images"
    if num_groups < batch_size_per_host * process_count:
        hosts = f"{process_count} hosts x " if process_count > 1 else ""
        raise ValueError(f"store {store.path}: {'the given records' if ids is not None else f'split {split!r}'} "
                         f"has {num_groups} {unit}, fewer than "
                         f"{hosts}batch_size_per_host={batch_size_per_host}")
    stream_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    views = SampleViews(store.data_source(), (offsets, record_ids), spec["crops"],
                        fields=spec.get("fields", ()), with_record_ids=with_record_ids)
    # EpochShuffle is grain's .shuffle(), order for order, without its per-element cost on small sets.
    batches = (EpochShuffle(grain.MapDataset.range(num_groups).seed(stream_seed))
               .repeat(None)
               .random_map(views)
               .batch(batch_size_per_host, drop_remainder=True))
    return batches[process_index::process_count] if process_count > 1 else batches


def _keep_worker_off_the_accelerator(worker_index: int, worker_count: int) -> None:
    """Grain workers import jax (google/grain#820); on a GPU host each would otherwise be able to start a
    CUDA backend and take device memory. Host transforms need no device: pin them to the CPU."""
    del worker_index, worker_count
    import os
    import sys

    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def to_iterator(dataset: grain.MapDataset, *, num_workers: int, num_threads: int, prefetch_batches: int):
    # Buffers count batches here (the dataset is batched before to_iter_dataset), so keep them small:
    # Grain's default of 500 would hold hundreds of full batches in memory.
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
            worker_init_fn=_keep_worker_off_the_accelerator)
    return iter(iter_dataset)


def make_pretrain_iterator(store: Store, *, spec: dict, batch_size_per_host: int, seed: int,
                           split: str | None = "train", num_workers: int = 0, num_threads: int = 2,
                           prefetch_batches: int = 4, process_index: int | None = None,
                           process_count: int | None = None, with_record_ids: bool = False,
                           ids: np.ndarray | None = None):
    """A checkpointable grain DatasetIterator of pretraining batches, endless (epochs reshuffled).

    spec: {"sampler": "pairs"|"micle", "crops": [{"name", "num", "size", "scale"[, "ratio", "flip"]}]}.
    Resume with `it.set_state(saved)` or orbax `grain.checkpoint.CheckpointRestore(it)`.
    """
    dataset = make_pretrain_dataset(store, spec=spec, batch_size_per_host=batch_size_per_host, seed=seed,
                                    split=split, process_index=process_index, process_count=process_count,
                                    with_record_ids=with_record_ids, ids=ids)
    return to_iterator(dataset, num_workers=num_workers, num_threads=num_threads,
                        prefetch_batches=prefetch_batches)


def eval_ids(store: Store, *, split: str | None, batch_size_per_host: int, process_index: int,
             process_count: int) -> np.ndarray:
    """This host's record ids for evaluation, padded with -1 to a length every host shares."""
    ids = store.ids(split)
    if len(ids) == 0:
        raise ValueError(f"store {store.path}: split {split!r} has no records to evaluate")
    per_host = -(-len(ids) // process_count)
    num_batches = -(-per_host // batch_size_per_host)
    host_ids = ids[process_index::process_count]
    padded = np.full(num_batches * batch_size_per_host, -1, np.int64)
    padded[:len(host_ids)] = host_ids
    return padded


def make_eval_dataset(store: Store, *, split: str | None, image_size: int, batch_size_per_host: int,
                      process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    process_index, process_count = _host(process_index, process_count)
    ids = eval_ids(store, split=split, batch_size_per_host=batch_size_per_host,
                   process_index=process_index, process_count=process_count)
    load = LoadForEval(store.data_source(), image_size=image_size, channels=store.channels(store.ids(split)),
                       num_labels=len(store.label_names))
    return grain.MapDataset.source(ids).map(load).batch(batch_size_per_host, drop_remainder=True)


def make_eval_iterator(store: Store, *, split: str | None, image_size: int, batch_size_per_host: int,
                       num_workers: int = 0, num_threads: int = 2, prefetch_batches: int = 4,
                       process_index: int | None = None, process_count: int | None = None):
    """One deterministic pass over `split` in record-id order (padded last batch, see module docstring)."""
    dataset = make_eval_dataset(store, split=split, image_size=image_size,
                                batch_size_per_host=batch_size_per_host, process_index=process_index,
                                process_count=process_count)
    return to_iterator(dataset, num_workers=num_workers, num_threads=num_threads,
                        prefetch_batches=prefetch_batches)
