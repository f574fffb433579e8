"""Evaluation records: what an evaluation run writes (`write_eval`) and how runs are read back and
lined up record by record (`read_eval`, `align_runs`); the report (report.py) only reads these.

An evaluation run (linear probe, fine-tune, zero-shot on another store) writes `E/eval/`:

E/eval/ layout (version 1):
  summary.json          written LAST (a run without it is incomplete and refused)
  predictions.npz       record_ids int64 [N], labels float32 [N, L] (NaN missing), probs float32 [N, L],
                        label_names str [L], split str, store_fingerprint str, and optionally
                        thresholds float32 [L]: decision thresholds chosen on the validation split (NaN
                        where none), at which the operating-point metrics are measured
  curves.json           optional {"steps": [...], "val_auc": [...]}: validation mean AUC vs training step
  robustness.json       optional, robustness.robustness_curves output
  label_fractions.json  optional {"fractions": [robustness.label_efficiency_entry, ...]}
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np

from medssl_jax import jsonio
from medssl_jax.evaluate import metrics, robustness


EVAL_FORMAT = "medssl_jax.eval"
EVAL_VERSION = 1
EVAL_SUBDIR = "eval"


class ReportError(ValueError):
    """Unusable evaluation workdir or incompatible runs (one-line message naming the input)."""


def store_fingerprint(store_path: str) -> str:
    """Identity of a store: sha256 (16 hex digits) of its store.json, which the writer writes last."""
    path = os.path.join(store_path, "store.json")
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError as e:
        raise ReportError(f"{path}: cannot read store.json ({e.strerror})") from None


def json_value(obj):
    """`obj` as it reads back from JSON (tuples -> lists, other objects by str()): what a stored record is
    compared against."""
    return json.loads(json.dumps(obj, default=str))


def write_eval(workdir: str, *, probs, labels, record_ids, label_names: Sequence[str], mode: str,
               method: str, init: str, split: str = "test", store_name: str = "",
               store_fingerprint: str = "", label_fraction: float = 1.0, name: str | None = None,
               curves: Mapping | None = None, robustness_curves: Mapping | None = None,
               label_fractions: Sequence[Mapping] | None = None, extra: Mapping | None = None,
               thresholds: Sequence[float | None] | None = None) -> dict:
    """Writes WORKDIR/eval/ (summary.json, predictions.npz and the optional curve files; the module
    docstring lists them) and returns the summary dict.

    probs/labels [N, L] (labels NaN = missing), record_ids [N] unique store record ids; mode e.g.
    "linear_probe" | "finetune" | "eval"; method = pretraining method of the init ("simclr", "micle",
    "dinov2", "supervised", "none", ...); init = what the encoder was initialised from ("random", an
    export dir, a converted checkpoint). `extra` is stored under summary["extra"] (e.g. the chosen
    regularisation, best step). `thresholds` (per label, from the validation split, see
    `metrics.youden_thresholds`) are where accuracy/sensitivity/specificity/F1 are measured; without them
    those metrics are the test split's own Youden points (an oracle, and said so in the summary).
    """
    probs, labels, label_names = metrics.check_predictions(probs, labels, label_names)
    record_ids = np.asarray(record_ids)
    if record_ids.shape != (len(probs),) or not np.issubdtype(record_ids.dtype, np.integer):
        raise ReportError(f"record_ids: expected {len(probs)} integers, got shape {record_ids.shape} "
                          f"dtype {record_ids.dtype}")
    if len(np.unique(record_ids)) != len(record_ids):
        raise ReportError("record_ids: duplicate record ids")
    if not 0 < float(label_fraction) <= 1:
        raise ReportError(f"label_fraction: must be in (0, 1], got {label_fraction}")
    out = os.path.join(workdir, EVAL_SUBDIR)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "predictions.tmp.npz")
    arrays = {}
    if thresholds is not None:
        if len(thresholds) != len(label_names):
            raise ReportError(f"thresholds: {len(thresholds)} values for {len(label_names)} labels")
        arrays["thresholds"] = np.array([np.nan if t is None else t for t in thresholds], np.float32)
        thresholds = [None if np.isnan(t) else float(t) for t in arrays["thresholds"]]
    np.savez(tmp, record_ids=record_ids.astype(np.int64), labels=labels.astype(np.float32),
             probs=probs.astype(np.float32), label_names=np.asarray(label_names, dtype=str),
             split=np.asarray(split), store_fingerprint=np.asarray(store_fingerprint), **arrays)
    os.replace(tmp, os.path.join(out, "predictions.npz"))
    if curves is not None:
        robustness.read_curve(curves, "curves")
        jsonio.write_json(os.path.join(out, "curves.json"), {"steps": [float(s) for s in curves["steps"]],
                                                       "val_auc": [metrics.json_number(v) for v in curves["val_auc"]]})
    if robustness_curves is not None:
        bad = [k for k in robustness_curves if k not in robustness.PERTURBATIONS]
        if bad or not all(isinstance(v, (list, tuple)) for v in robustness_curves.values()):
            raise ReportError(f"robustness_curves: expected {{perturbation in {robustness.PERTURBATIONS}: "
                              f"[entries]}}, got keys {sorted(robustness_curves)}")
        jsonio.write_json(os.path.join(out, "robustness.json"), dict(robustness_curves))
    if label_fractions is not None:
        jsonio.write_json(os.path.join(out, "label_fractions.json"),
                    {"fractions": robustness.label_efficiency_curve(label_fractions)})
    # Metrics from the float32 values actually saved, so summary.json and predictions.npz agree exactly.
    res = metrics.evaluate_predictions(probs=probs.astype(np.float32), labels=labels.astype(np.float32),
                                       label_names=label_names, thresholds=thresholds)
    summary = {
        "format": EVAL_FORMAT, "version": EVAL_VERSION,
        "name": name or os.path.basename(os.path.normpath(workdir)),
        "mode": str(mode), "method": str(method), "init": str(init), "split": str(split),
        "label_names": list(label_names), "num_examples": int(len(probs)),
        "label_fraction": float(label_fraction),
        "store": {"name": str(store_name), "fingerprint": str(store_fingerprint)},
        "mean_auc": res["mean_auc"],
        "top1_accuracy": res["top1_accuracy"],  # multi-class (one-hot) labels only, else None
        "per_label_auc": {n: v["auc"] for n, v in res["per_label"].items()},
        "metrics": res,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }
    jsonio.write_json(os.path.join(out, "summary.json"), summary)
    _tensorboard_scalars(out, summary)
    return summary


def _tensorboard_scalars(out: str, summary: dict) -> None:
    """The summary's test scalars also go to TensorBoard (E/eval/tensorboard, beside the training curves of
    a fine-tune in E/tensorboard), at the selected step where there is one."""
    from tensorboardX import SummaryWriter

    step = int(summary["extra"].get("best_step") or 0)
    prefix = f"{summary['split']}/"
    scalars = {"mean_auc": summary["mean_auc"], "top1_accuracy": summary["top1_accuracy"],
               **{f"auc/{name}": value for name, value in summary["per_label_auc"].items()}}
    with SummaryWriter(os.path.join(out, "tensorboard")) as writer:
        for name, value in scalars.items():
            if value is not None:
                writer.add_scalar(prefix + name, float(value), step)


@dataclasses.dataclass
class EvalRun:
    workdir: str
    name: str
    summary: dict
    record_ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    label_names: list
    split: str
    store_fingerprint: str
    curves: dict | None = None
    robustness: dict | None = None
    label_fractions: list | None = None
    thresholds: np.ndarray | None = None  # [L] validation-chosen thresholds (NaN none), or None


def _read_json(path: str, *, required: bool):
    if not os.path.exists(path):
        if required:
            raise ReportError(f"{path}: missing (not an evaluation workdir, or the run did not finish)")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: unreadable JSON ({e})") from None


VALIDATION_FILE = "validation.json"  # a read_test=False linear probe's record (evaluate/linear_probe.py)


def _validation_only(workdir: str) -> bool:
    """Whether `workdir` holds a read_test=False evaluation: a probe's validation.json or a fine-tune's
    finetune.json that says so."""
    if os.path.exists(os.path.join(workdir, VALIDATION_FILE)):
        return True
    path = os.path.join(workdir, "finetune.json")
    try:
        with open(path) as f:
            return json.load(f).get("read_test") is False
    except (OSError, ValueError):
        return False


def read_eval(workdir: str) -> EvalRun:
    """Loads and validates WORKDIR/eval/ (one-line ReportError naming the file on any problem)."""
    if not os.path.isdir(workdir):
        raise ReportError(f"{workdir}: not a directory")
    d = os.path.join(workdir, EVAL_SUBDIR)
    if not os.path.exists(os.path.join(d, "summary.json")) and _validation_only(workdir):
        raise ReportError(f"{workdir}: a validation-only evaluation (config.read_test=False) has no test predictions; "
                          "rerun its command with --config.read_test=True to read the test split")
    summary = _read_json(os.path.join(d, "summary.json"), required=True)
    if not isinstance(summary, dict) or summary.get("format") != EVAL_FORMAT:
        raise ReportError(f"{d}/summary.json: not a {EVAL_FORMAT} summary")
    if summary.get("version") != EVAL_VERSION:
        raise ReportError(f"{d}/summary.json: version {summary.get('version')}, this code reads {EVAL_VERSION}")
    pred_path = os.path.join(d, "predictions.npz")
    try:
        with np.load(pred_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ReportError(f"{pred_path}: unreadable ({e})") from None
    need = ("record_ids", "labels", "probs", "label_names")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ReportError(f"{pred_path}: missing arrays {missing}")
    try:
        probs, labels, names = metrics.check_predictions(arrays["probs"], arrays["labels"],
                                                         [str(n) for n in arrays["label_names"]])
    except metrics.MetricsError as e:
        raise ReportError(f"{pred_path}: {e}") from None
    record_ids = arrays["record_ids"]
    if record_ids.shape != (len(probs),) or len(np.unique(record_ids)) != len(record_ids):
        raise ReportError(f"{pred_path}: record_ids must be {len(probs)} unique ids, got shape "
                          f"{record_ids.shape}")
    thresholds = arrays.get("thresholds")
    if thresholds is not None and thresholds.shape != (len(names),):
        raise ReportError(f"{pred_path}: thresholds must have shape ({len(names)},), got {thresholds.shape}")
    if list(summary.get("label_names", [])) != names:
        raise ReportError(f"{d}: label_names differ between summary.json and predictions.npz")
    curves = _read_json(os.path.join(d, "curves.json"), required=False)
    if curves is not None:
        try:
            robustness.read_curve(curves, f"{d}/curves.json")
        except robustness.RobustnessError as e:
            raise ReportError(str(e)) from None
    fractions = _read_json(os.path.join(d, "label_fractions.json"), required=False)
    if fractions is not None:
        try:
            fractions = robustness.label_efficiency_curve(fractions.get("fractions", []))
        except (robustness.RobustnessError, AttributeError, TypeError, ValueError) as e:
            raise ReportError(f"{d}/label_fractions.json: {e}") from None
    rob = _read_json(os.path.join(d, "robustness.json"), required=False)
    if rob is not None and (not isinstance(rob, dict) or
                            not all(k in robustness.PERTURBATIONS and isinstance(v, list) for k, v in rob.items())):
        raise ReportError(f"{d}/robustness.json: expected {{perturbation: [{{strength, mean_auc, ...}}]}}")
    return EvalRun(
        workdir=workdir, name=str(summary.get("name") or os.path.basename(os.path.normpath(workdir))),
        summary=summary, record_ids=record_ids.astype(np.int64), labels=labels, probs=probs,
        label_names=names, split=str(arrays.get("split", summary.get("split", ""))),
        store_fingerprint=str(arrays.get("store_fingerprint", "")), curves=curves, robustness=rob,
        label_fractions=fractions, thresholds=None if thresholds is None else thresholds.astype(np.float64))


def align_runs(runs: Sequence[EvalRun]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Checks the runs are on the same store, split, records and labels; returns (record_ids, labels,
    {name: probs}) in a common record order (ascending record id)."""
    ref = runs[0]
    for run in runs[1:]:
        where = f"{run.workdir} vs {ref.workdir}"
        if run.label_names != ref.label_names:
            raise ReportError(f"{where}: different label names {run.label_names} vs {ref.label_names}")
        if run.store_fingerprint != ref.store_fingerprint:
            raise ReportError(f"{where}: different stores (fingerprint {run.store_fingerprint!r} vs "
                              f"{ref.store_fingerprint!r})")
        if run.split != ref.split:
            raise ReportError(f"{where}: different splits {run.split!r} vs {ref.split!r}")
        if len(run.record_ids) != len(ref.record_ids) or not np.array_equal(np.sort(run.record_ids),
                                                                             np.sort(ref.record_ids)):
            only = np.setdiff1d(run.record_ids, ref.record_ids).size + np.setdiff1d(ref.record_ids,
                                                                                    run.record_ids).size
            raise ReportError(f"{where}: different test records ({len(run.record_ids)} vs "
                              f"{len(ref.record_ids)} records, {only} not in both)")
    order = {run.name: np.argsort(run.record_ids, kind="stable") for run in runs}
    ids = ref.record_ids[order[ref.name]]
    labels = ref.labels[order[ref.name]]
    for run in runs[1:]:
        lab = run.labels[order[run.name]]
        same = (lab == labels) | (np.isnan(lab) & np.isnan(labels))
        if not same.all():
            r, c = np.argwhere(~same)[0]
            raise ReportError(f"{run.workdir} vs {ref.workdir}: different labels (first at record "
                              f"{ids[r]}, label {ref.label_names[c]!r}: {lab[r, c]} vs {labels[r, c]})")
    return ids, labels, {run.name: run.probs[order[run.name]] for run in runs}
