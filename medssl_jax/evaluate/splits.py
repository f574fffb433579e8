"""Deterministic patient-wise evaluation splits, saved in the workdir as E/splits.json.

Every evaluation (linear probe, fine-tune) of one store must see the same records, or a paired comparison
of two encoders is meaningless. The splits here are a pure function of the store's split column, its
patient keys and a seed:

- test: the store's `splits.test` split (the held-out patients chosen at ingestion);
- val: `splits.val` names a store split ('val'); '' (the default) means the store's own 'val' split when it
  has one (MedMNIST's official split, `ingest --val-fraction`, the phantoms), otherwise carved from train;
  `splits.val` equal to `splits.train` always carves: the patients of the train split whose hash bucket of
  (seed, patient key) is below `val_fraction` (`patient_split`). A patient's bucket does not depend on
  which other patients exist, so adding records never moves a patient between train and val;
- train: the rest of the store's train split;
- label fractions: nested subsets of the train *patients*: patients are ordered by another hash of
  (seed, patient key) and fraction f takes the first ceil(f * P) of them with all their records, so the
  10 % subset is inside the 25 % subset, and so on.

E/splits.json records the record ids, the parameters, the store fingerprint, a fingerprint of the
train/val/test ids (equal across runs with any label fractions) and a checksum of all ids. A rerun in the
same workdir checks that the saved splits equal the ones its config gives; `splits.file` reuses another
workdir's splits.json after checking it belongs to the same store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import numpy as np

from medssl_jax import jsonio
from medssl_jax.data.store import Store
from medssl_jax.evaluate import records

SPLITS_FORMAT = "medssl_jax.splits"
SPLITS_VERSION = 1
SPLITS_FILE = "splits.json"


class SplitsError(ValueError):
    """Splits that cannot be made or reused (one line naming the input)."""


@dataclasses.dataclass
class Splits:
    train: np.ndarray  # record ids, increasing
    val: np.ndarray
    test: np.ndarray
    fractions: dict[float, np.ndarray]  # label fraction -> record ids (a subset of train), nested
    store_fingerprint: str
    params: dict

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex) of the train/val/test record ids: equal fingerprints mean identical splits.

        The label-fraction subsets are left out: they are a function of the train ids and the seed (in
        `params`), and runs with different fraction lists still share train, val and test."""
        payload = {k: v for k, v in _ids_payload(self).items() if k != "fractions"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def checksum(self) -> str:
        """sha256 (16 hex) of every id in the file, fractions included (detects edits)."""
        return hashlib.sha256(json.dumps(_ids_payload(self), sort_keys=True).encode()).hexdigest()[:16]

    def fraction_ids(self, fraction: float) -> np.ndarray:
        key = _fraction_key(fraction)
        if key not in self.fractions:
            raise SplitsError(f"label fraction {fraction} is not in the splits (have {sorted(self.fractions)})")
        return self.fractions[key]


def _fraction_key(fraction) -> float:
    return round(float(fraction), 6)


def _ids_payload(splits: Splits) -> dict:
    return {
        "train": splits.train.tolist(),
        "val": splits.val.tolist(),
        "test": splits.test.tolist(),
        "fractions": {f"{f:g}": ids.tolist() for f, ids in sorted(splits.fractions.items())},
    }


def check_fractions(label_fractions) -> list[float]:
    """Validates config.label_fractions: a non-empty list of distinct numbers in (0, 1]."""
    if isinstance(label_fractions, (int, float)):
        label_fractions = (label_fractions,)
    fractions = [_fraction_key(f) for f in label_fractions]
    if not fractions:
        raise SplitsError("config.label_fractions is empty: give e.g. (1.0,) or (0.01, 0.1, 0.25, 0.5, 1.0)")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise SplitsError(f"config.label_fractions {list(label_fractions)}: fractions must be in (0, 1], got {bad}")
    if len(set(fractions)) != len(fractions):
        raise SplitsError(f"config.label_fractions {list(label_fractions)} has duplicates")
    return sorted(fractions)


def patient_split(patients: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Deterministic patient-wise mask: True for records whose patient falls in the held-out `fraction`.

    Uses a hash of (seed, patient key), so the split does not depend on record order or on which
    other patients are present, and every run comparing encoders gets the same split.
    """
    def bucket(key: str) -> float:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    unique = np.unique(patients)
    held = {p for p in unique if bucket(str(p)) < fraction}
    return np.array([p in held for p in patients], dtype=bool)


def _hash_order(keys: np.ndarray, seed: int) -> np.ndarray:
    """Permutation of `keys` by sha256 of (seed, key): independent of record order and of other keys."""
    digests = [hashlib.sha256(f"{seed}:fraction:{k}".encode()).digest()[:8] for k in keys]
    return np.argsort([int.from_bytes(d, "little") for d in digests], kind="stable")


def _records_of(store: Store, patients: set, ids: np.ndarray) -> np.ndarray:
    keep = np.fromiter((p in patients for p in store.patients[ids]), bool, count=len(ids))
    return ids[keep]


def val_split_of(store: Store, cfg) -> str:
    """The store split used for validation ('' = carve it from the train patients), see the module docstring."""
    if cfg.val == cfg.train:
        return ""
    if cfg.val:
        return cfg.val
    return "val" if "val" in set(store.splits.tolist()) else ""


def make_splits(store: Store, cfg, label_fractions) -> Splits:
    """The splits `cfg` (config.splits) gives on `store` (see the module docstring)."""
    fractions = check_fractions(label_fractions)
    where = f"store {store.path}"
    train_all = store.ids(cfg.train)
    test = store.ids(cfg.test)
    val_split = val_split_of(store, cfg)
    if val_split:
        val, train = store.ids(val_split), train_all
    else:
        if not 0 < cfg.val_fraction < 1:
            raise SplitsError(f"config.splits.val_fraction={cfg.val_fraction} must be in (0, 1) (or name a "
                              "store split in config.splits.val)")
        held = patient_split(store.patients[train_all], fraction=cfg.val_fraction, seed=cfg.seed)
        val, train = train_all[held], train_all[~held]
    for name, ids in (("train", train), ("val", val), ("test", test)):
        if len(ids) == 0:
            raise SplitsError(f"{where}: the {name} split is empty (config.splits: train={cfg.train!r}, "
                              f"val={cfg.val!r}, val_fraction={cfg.val_fraction}, test={cfg.test!r})")
    parts = {"train": set(store.patients[train]), "val": set(store.patients[val]), "test": set(store.patients[test])}
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        shared = parts[a] & parts[b]
        if shared:
            raise SplitsError(f"{where}: {len(shared)} patient(s) have records in both {a} and {b} "
                              "(evaluation splits must be patient-wise)")
    train_patients = np.array(sorted(parts["train"]))
    ordered = train_patients[_hash_order(train_patients, cfg.seed)]
    subsets = {}
    for fraction in fractions:
        count = max(1, math.ceil(fraction * len(ordered)))
        subsets[fraction] = _records_of(store, set(ordered[:count]), train)
    params = {"train": cfg.train, "val": val_split, "test": cfg.test, "val_fraction": float(cfg.val_fraction),
              "seed": int(cfg.seed), "label_fractions": fractions}
    return Splits(train=train, val=val, test=test, fractions=subsets,
                  store_fingerprint=records.store_fingerprint(store.path), params=params)


def save(path: str, splits: Splits, store: Store) -> None:
    payload = {
        "format": SPLITS_FORMAT, "version": SPLITS_VERSION,
        "store": {"name": store.name, "fingerprint": splits.store_fingerprint},
        "params": splits.params, "fingerprint": splits.fingerprint, "checksum": splits.checksum,
        "num_patients": {name: int(len(np.unique(store.patients[getattr(splits, name)])))
                         for name in ("train", "val", "test")},
        **_ids_payload(splits),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    jsonio.write_json(path, payload, indent=None, allow_nan=True)


def load(path: str) -> Splits:
    try:
        with open(path) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise SplitsError(f"{path}: splits file does not exist") from None
    except (OSError, json.JSONDecodeError) as error:
        raise SplitsError(f"{path}: unreadable splits file ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != SPLITS_FORMAT:
        raise SplitsError(f"{path}: not a {SPLITS_FORMAT} file")
    if payload.get("version") != SPLITS_VERSION:
        raise SplitsError(f"{path}: splits version {payload.get('version')}, this code reads {SPLITS_VERSION}")
    ids = lambda values: np.asarray(values, np.int64)  # noqa: E731
    splits = Splits(
        train=ids(payload["train"]), val=ids(payload["val"]), test=ids(payload["test"]),
        fractions={_fraction_key(f): ids(v) for f, v in payload["fractions"].items()},
        store_fingerprint=payload["store"]["fingerprint"], params=payload["params"],
    )
    if splits.checksum != payload.get("checksum"):
        raise SplitsError(f"{path}: record ids do not match the file's checksum (edited or corrupt)")
    return splits


def resolve(workdir: str, store: Store, cfg, label_fractions) -> Splits:
    """The splits of this evaluation, saved to WORKDIR/splits.json.

    With `cfg.file` the splits come from that file (another workdir's, so several encoders are evaluated
    on identical records); otherwise they are made from the store and, if WORKDIR/splits.json already
    exists (a rerun), must equal it.
    """
    path = os.path.join(workdir, SPLITS_FILE)
    fingerprint = records.store_fingerprint(store.path)
    if cfg.file:
        splits = load(cfg.file)
        if splits.store_fingerprint != fingerprint:
            raise SplitsError(f"config.splits.file={cfg.file} was made on another store (fingerprint "
                              f"{splits.store_fingerprint}, this store {store.path} has {fingerprint})")
        for fraction in check_fractions(label_fractions):
            splits.fraction_ids(fraction)
        outside = np.setdiff1d(np.concatenate([splits.train, splits.val, splits.test]), np.arange(store.num_records))
        if outside.size:
            raise SplitsError(f"config.splits.file={cfg.file}: record id {int(outside[0])} is not in {store.path}")
    else:
        splits = make_splits(store, cfg, label_fractions)
        if os.path.exists(path):
            saved = load(path)
            if saved.store_fingerprint != fingerprint:
                raise SplitsError(f"{path} was made on another store (fingerprint {saved.store_fingerprint}, "
                                  f"this store has {fingerprint}); use a new workdir")
            same_fractions = all(np.array_equal(ids, splits.fractions[f])
                                 for f, ids in saved.fractions.items() if f in splits.fractions)
            if saved.fingerprint != splits.fingerprint or saved.params["seed"] != splits.params["seed"] \
                    or not same_fractions:
                raise SplitsError(f"{path} holds other splits than this config gives (config.splits changed); "
                                  "use a new workdir or config.splits.file")
    save(path, splits, store)
    return splits


def describe(splits: Splits, store: Store) -> str:
    def count(ids):
        return f"{len(ids)} images / {len(np.unique(store.patients[ids]))} patients"

    fractions = ", ".join(f"{f:g}: {count(ids)}" for f, ids in sorted(splits.fractions.items()))
    p = splits.params
    source = (f"the store's {p['val']!r} split" if p["val"] else
              f"{p['val_fraction']:g} of the {p['train']!r} patients, carved by patient hash")
    return (f"splits {splits.fingerprint}: train {count(splits.train)}, val {count(splits.val)} ({source}), "
            f"test {count(splits.test)}; label fractions {fractions}")
