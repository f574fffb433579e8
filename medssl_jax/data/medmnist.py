"""MedMNIST v2 (Yang et al. 2023, https://medmnist.com) .npz files -> a store, keeping the official splits.

    python -m medssl_jax.ingest --medmnist=pneumoniamnist.npz --output=STORE

A MedMNIST file holds `train_images`, `val_images`, `test_images` (uint8 [N, H, W] grey or [N, H, W, 3]
RGB; H = 28, or 64/128/224 for MedMNIST+) and the matching `*_labels` (integer [N, 1] class indices, or
[N, K] 0/1 for the multi-label ChestMNIST). Every image becomes one record in the store split of the same
name, so MedMNIST's own validation split is the one evaluation uses (evaluate/splits.py).

Labels become store label columns that the existing evaluation scores per column, so its mean AUC is
MedMNIST's metric:
- binary (PneumoniaMNIST, BreastMNIST): one column, the class with index 1 (AUC of the class-1 score);
- multi-class and ordinal (PathMNIST, OrganAMNIST, RetinaMNIST, ...): one-vs-rest columns, one per class,
  whose mean AUC is MedMNIST's macro AUC (the mean of the per-class one-vs-rest AUCs, `medmnist.Evaluator`);
- multi-label (ChestMNIST): the K columns as they are.
The task and the class names of the 2D subsets come from `SUBSETS` (MedMNIST v2's `INFO`), chosen by the
file name (`pneumoniamnist.npz`, `chestmnist_224.npz`); `task=` and `label_names=` override it, and a file
of unknown name is read by its label layout (integer column: multi-class, or binary with two classes;
several 0/1 columns: multi-label).

MedMNIST has no patient ids: every image is its own "patient" (key `medmnist-<split>-<index>`), so MICLe
degenerates to SimCLR on such a store and patient-wise splits are the official ones. Nothing is downloaded:
get the files from https://zenodo.org/records/10519652 or `pip install medmnist` yourself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
TASKS = ("binary", "multi-class", "multi-label", "ordinal")

# The 2D subsets of MedMNIST v2: task and class names (index order), as in medmnist's INFO.
SUBSETS = {
    "pathmnist": ("multi-class", ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                  "normal colon mucosa", "cancer-associated stroma",
                                  "colorectal adenocarcinoma epithelium")),
    "chestmnist": ("multi-label", ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                                   "pleural", "hernia")),
    "dermamnist": ("multi-class", ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                   "melanocytic nevi", "vascular lesions")),
    "octmnist": ("multi-class", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": ("binary", ("normal", "pneumonia")),
    "retinamnist": ("ordinal", ("0", "1", "2", "3", "4")),
    "breastmnist": ("binary", ("malignant", "normal, benign")),
    "bloodmnist": ("multi-class", ("basophil", "eosinophil", "erythroblast", "immature granulocytes",
                                   "lymphocyte", "monocyte", "neutrophil", "platelet")),
    "tissuemnist": ("multi-class", ("collecting duct, connecting tubule", "distal convoluted tubule",
                                    "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes",
                                    "podocytes", "proximal tubule segments", "thick ascending limb")),
    "organamnist": ("multi-class", ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                                    "liver", "lung-left", "lung-right", "pancreas", "spleen")),
}
SUBSETS["organcmnist"] = SUBSETS["organsmnist"] = SUBSETS["organamnist"]


class MedMNISTError(ValueError):
    """A malformed MedMNIST file or option: one line naming the file and the key."""


def subset_of(path: str | os.PathLike) -> str | None:
    """'pneumoniamnist' for pneumoniamnist.npz or pneumoniamnist_224.npz; None for an unknown name."""
    stem = re.sub(r"_\d+$", "", Path(path).name.lower().removesuffix(".npz"))
    return stem if stem in SUBSETS else None


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MedMNISTError(f"--medmnist {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in keys]
            if missing:
                raise MedMNISTError(f"--medmnist {path}: key {missing[0]!r} is missing (a MedMNIST file has "
                                    f"train/val/test _images and _labels; found {sorted(keys)})")
            return {k: z[k] for k in (f"{s}_{t}" for s in SPLITS for t in ("images", "labels"))}
    except MedMNISTError:
        raise
    except (OSError, ValueError, EOFError) as error:  # not a zip / damaged member / pickled object arrays
        raise MedMNISTError(f"--medmnist {path}: not a readable .npz file ({error})") from None


def _check_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise MedMNISTError(f"--medmnist {path}: key {key!r} has dtype {images.dtype}, expected uint8")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)) or 0 in images.shape:
        raise MedMNISTError(f"--medmnist {path}: key {key!r} has shape {images.shape}, expected [N, H, W] or "
                            "[N, H, W, 3]")
    lkey = f"{split}_labels"
    if not np.issubdtype(labels.dtype, np.integer):
        raise MedMNISTError(f"--medmnist {path}: key {lkey!r} has dtype {labels.dtype}, expected integers")
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise MedMNISTError(f"--medmnist {path}: key {lkey!r} has shape {labels.shape} for {images.shape[0]} "
                            f"images in {key!r} (lengths must match)")


def _infer_task(labels: np.ndarray) -> str:
    if labels.shape[1] > 1:
        return "multi-label"
    return "binary" if set(np.unique(labels).tolist()) <= {0, 1} else "multi-class"


def label_columns(labels: np.ndarray, *, task: str, num_classes: int) -> np.ndarray:
    """Integer MedMNIST labels [N, 1] or [N, K] -> float32 store label columns [N, L] (module docstring)."""
    if task == "multi-label":
        return labels.astype(np.float32)
    classes = labels[:, 0]
    if task == "binary":
        return (classes == 1).astype(np.float32)[:, None]
    return (classes[:, None] == np.arange(num_classes)[None]).astype(np.float32)


def read_medmnist(path: str | os.PathLike, *, task: str | None = None,
                  label_names: tuple[str, ...] | None = None) -> dict:
    """Validates a MedMNIST .npz and returns {"task", "class_names", "label_names", "subset",
    "splits": {split: (images [N, H, W(, 3)] uint8, label columns float32 [N, L])}}."""
    path = Path(path)
    arrays = _load(path)
    for split in SPLITS:
        _check_split(path, split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
    shapes = {s: arrays[f"{s}_images"].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise MedMNISTError(f"--medmnist {path}: image shapes differ between splits {shapes}")
    raw = {s: arrays[f"{s}_labels"].reshape(len(arrays[f"{s}_labels"]), -1) for s in SPLITS}
    widths = {s: r.shape[1] for s, r in raw.items()}
    if len(set(widths.values())) != 1:
        raise MedMNISTError(f"--medmnist {path}: label columns differ between splits {widths}")
    every = np.concatenate(list(raw.values()))
    subset = subset_of(path)
    known_task, known_names = SUBSETS.get(subset, (None, None))
    if task is not None and task not in TASKS:
        raise MedMNISTError(f"--medmnist-task={task!r} is not one of {TASKS}")
    task = task or known_task or _infer_task(every)
    if task == "multi-label":
        if not set(np.unique(every).tolist()) <= {0, 1}:
            raise MedMNISTError(f"--medmnist {path}: multi-label labels must be 0/1, found values "
                                f"{sorted(set(np.unique(every).tolist()) - {0, 1})[:5]}")
        num_classes = every.shape[1]
    else:
        if every.shape[1] != 1:
            raise MedMNISTError(f"--medmnist {path}: a {task} task needs one label column, key 'train_labels' "
                                f"has {every.shape[1]}")
        if every.min() < 0:
            raise MedMNISTError(f"--medmnist {path}: negative class index {int(every.min())} in the labels")
        num_classes = max(int(every.max()) + 1, len(known_names or ()), 2)
        if known_names and label_names is None and num_classes > len(known_names):
            raise MedMNISTError(f"--medmnist {path}: class index {int(every.max())} in the labels, but {subset} has "
                                f"{len(known_names)} classes (pass --medmnist-task and --label-names for another file)")
    class_names = tuple(label_names or known_names or (str(i) for i in range(num_classes)))
    if len(class_names) != num_classes:
        raise MedMNISTError(f"--label-names: {len(class_names)} names for {num_classes} classes of {path.name}")
    if label_names is None and known_names is None and task != "multi-label":
        class_names = tuple(f"class_{n}" for n in class_names)
    names = (class_names[1],) if task == "binary" else class_names
    splits = {s: (arrays[f"{s}_images"], label_columns(raw[s], task=task, num_classes=num_classes)) for s in SPLITS}
    return {"task": task, "class_names": list(class_names), "label_names": list(names), "subset": subset,
            "splits": splits}


def write_store(path: str | os.PathLike, output: str | os.PathLike, *, task: str | None = None,
                label_names: tuple[str, ...] | None = None, name: str | None = None, overwrite: bool = False) -> dict:
    """Writes the MedMNIST file at `path` as a store at `output` (into OUTPUT.partial, renamed when complete);
    returns the report also written to OUTPUT/ingest_report.json."""
    from medssl_jax.data.store import StoreError, StoreWriter, commit_store

    output = Path(output).absolute()
    if (output / "store.json").exists() and not overwrite:
        raise MedMNISTError(f"--output {output}: a store already exists there; pass --overwrite to replace it")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "store.json").exists())):
        raise MedMNISTError(f"--output {output}: exists and is not a store; choose another path")
    data = read_medmnist(path, task=task, label_names=label_names)
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    counts = {}
    try:
        with StoreWriter(partial, name=name or re.sub(r"[^A-Za-z0-9_-]+", "_", output.name),
                         label_names=data["label_names"], overwrite=True) as writer:
            for split in SPLITS:
                images, labels = data["splits"][split]
                for i in range(len(images)):
                    image = images[i]
                    if image.ndim == 3 and image.shape[-1] == 1:
                        image = image[..., 0]
                    writer.add(image=np.ascontiguousarray(image), patient=f"medmnist-{split}-{i}",
                               study=f"medmnist-{split}-{i}", labels=labels[i], bits_stored=8, split=split,
                               source_id=i)
                counts[split] = int(len(images))
    except StoreError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise MedMNISTError(str(error)) from None
    report = {"format": "medssl_jax.ingest_report", "version": 1, "mode": "medmnist",
              "source": Path(path).name, "subset": data["subset"], "task": data["task"],
              "class_names": data["class_names"], "label_names": data["label_names"], "records": counts,
              "files_seen": 1, "files_written": 1, "records_written": int(sum(counts.values())),
              "num_skipped": 0, "num_filtered": 0, "skipped": [], "filtered": [], "reason_counts": {}}
    (partial / "ingest_report.json").write_text(json.dumps(report, indent=1) + "\n")
    commit_store(partial, output)
    return report
