"""Evaluation workdirs (write/read, the layout below) and the paired-comparison report.

An evaluation run (linear probe, fine-tune, zero-shot on another store) writes `E/eval/` with
`write_eval`; `compare_runs` reads several of them, refuses unless they hold the same test records and
labels of the same store, runs the paired bootstrap and writes `R/report.md`, `R/comparison.json` and
PNG plots (ROC per label, label efficiency, robustness, convergence).

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
import math
import os
import re
from typing import Mapping, Sequence

import numpy as np

from medssl_jax.evaluate import bootstrap, metrics, robustness

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


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def write_eval(workdir: str, *, probs, labels, record_ids, label_names: Sequence[str], mode: str,
               method: str, init: str, split: str = "test", store_name: str = "",
               store_fingerprint: str = "", label_fraction: float = 1.0, name: str | None = None,
               curves: Mapping | None = None, robustness_curves: Mapping | None = None,
               label_fractions: Sequence[Mapping] | None = None, extra: Mapping | None = None,
               thresholds: Sequence[float | None] | None = None) -> dict:
    """Writes WORKDIR/eval/ per the contract and returns the summary dict.

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
        robustness._curve(curves, "curves")
        _write_json(os.path.join(out, "curves.json"), {"steps": [float(s) for s in curves["steps"]],
                                                       "val_auc": [metrics._num(v) for v in curves["val_auc"]]})
    if robustness_curves is not None:
        bad = [k for k in robustness_curves if k not in robustness.PERTURBATIONS]
        if bad or not all(isinstance(v, (list, tuple)) for v in robustness_curves.values()):
            raise ReportError(f"robustness_curves: expected {{perturbation in {robustness.PERTURBATIONS}: "
                              f"[entries]}}, got keys {sorted(robustness_curves)}")
        _write_json(os.path.join(out, "robustness.json"), dict(robustness_curves))
    if label_fractions is not None:
        _write_json(os.path.join(out, "label_fractions.json"),
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
    _write_json(os.path.join(out, "summary.json"), summary)
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


def read_eval(workdir: str) -> EvalRun:
    """Loads and validates WORKDIR/eval/ (one-line ReportError naming the file on any problem)."""
    if not os.path.isdir(workdir):
        raise ReportError(f"{workdir}: not a directory")
    d = os.path.join(workdir, EVAL_SUBDIR)
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
            robustness._curve(curves, f"{d}/curves.json")
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


def _unique_names(runs: Sequence[EvalRun]) -> None:
    seen = {}
    for run in runs:
        base = run.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run.name = f"{base}#{seen[base]}"


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ci(s: Mapping, digits=3) -> str:
    if s["point"] is None:
        return "undefined"
    if s["ci_low"] is None:
        return _fmt(s["point"], digits)
    return f"{_fmt(s['point'], digits)} [{_fmt(s['ci_low'], digits)}, {_fmt(s['ci_high'], digits)}]"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "label"


def _convergence(runs: Sequence[EvalRun]) -> list[dict]:
    """Every run with curves and a non-random init against every random-init run with curves."""
    randoms = [r for r in runs if r.curves and str(r.summary.get("init", "")).lower() == "random"]
    out = []
    for rnd in randoms:
        for run in runs:
            if run is rnd or not run.curves or str(run.summary.get("init", "")).lower() == "random":
                continue
            res = robustness.convergence_reduction(ssl_curve=run.curves, random_curve=rnd.curves)
            # A run cut off by its step limit while still improving has not converged: a reduction
            # measured against it flatters the pretrained init (the target is too low).
            converged = {name: r.summary.get("extra", {}).get("converged") for name, r in
                         (("ssl", run), ("random", rnd))}
            out.append({"ssl": run.name, "random": rnd.name, **res, "ssl_converged": converged["ssl"],
                        "random_converged": converged["random"]})
    return out


def _plots(out_dir, runs, labels, probs, label_names, convergence, boot) -> dict[str, list[str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as skm

    files = {"roc": [], "label_efficiency": [], "robustness": [], "convergence": []}

    def roc_axes(ax, j, lname):
        y = labels[:, j]
        keep = ~np.isnan(y)
        defined = metrics.undefined_reason(y[keep]) is None
        for name, p in probs.items():
            if not defined:
                continue
            fpr, tpr, _ = skm.roc_curve(y[keep], p[keep, j])
            auc = boot["models"][name]["per_label"][lname]["auc"]
            ci = (f" [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" if auc["ci_low"] is not None else "")
            ax.plot(fpr, tpr, lw=1.2, label=f"{name}: AUC {skm.roc_auc_score(y[keep], p[keep, j]):.3f}{ci}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_title(lname if defined else f"{lname} (undefined)", fontsize=9)
        ax.set_xlim(-0.01, 1.01)          # a perfect curve runs along the axes: keep it visible
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false positive rate (1 - specificity)", fontsize=8)
        ax.set_ylabel("true positive rate (sensitivity)", fontsize=8)
        if defined:
            ax.legend(fontsize=7, loc="lower right", title="AUC [95% CI]", title_fontsize=7)

    for j, lname in enumerate(label_names):
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        roc_axes(ax, j, lname)
        fname = f"roc_{j:02d}_{_safe(lname)}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)
        files["roc"].append(fname)
    cols = min(4, len(label_names))
    rows = math.ceil(len(label_names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for j, lname in enumerate(label_names):
        roc_axes(axes[j // cols][j % cols], j, lname)
    for k in range(len(label_names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "roc_all.png"), dpi=90)
    plt.close(fig)
    files["roc"].insert(0, "roc_all.png")

    if any(r.label_fractions for r in runs):
        fig, ax = plt.subplots(figsize=(5, 4))
        ticks = set()
        for r in runs:
            if not r.label_fractions:
                continue
            f = [e["fraction"] * 100 for e in r.label_fractions]
            m = np.array([np.nan if e["mean_auc"] is None else e["mean_auc"] for e in r.label_fractions])
            lo = np.array([np.nan if e.get("ci_low") is None else e["ci_low"] for e in r.label_fractions])
            hi = np.array([np.nan if e.get("ci_high") is None else e["ci_high"] for e in r.label_fractions])
            line, = ax.plot(f, m, marker="o", label=r.name)
            ax.fill_between(f, lo, hi, alpha=0.15, color=line.get_color())
            ticks.update(f)
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel("labelled training data (%)")
        ax.set_ylabel("test mean AUC (95% CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "label_efficiency.png"), dpi=110)
        plt.close(fig)
        files["label_efficiency"].append("label_efficiency.png")

    kinds = [k for k in robustness.PERTURBATIONS if any(r.robustness and k in r.robustness for r in runs)]
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for r in runs:
                if r.robustness and kind in r.robustness:
                    e = r.robustness[kind]
                    x_values = [x["strength"] for x in e]
                    line, = ax.plot(x_values, [np.nan if x["mean_auc"] is None else x["mean_auc"] for x in e],
                                    marker="o", label=r.name)
                    lo = [np.nan if x.get("ci_low") is None else x["ci_low"] for x in e]
                    hi = [np.nan if x.get("ci_high") is None else x["ci_high"] for x in e]
                    ax.fill_between(x_values, lo, hi, alpha=0.15, color=line.get_color())
            ax.set_title(kind)
            ax.set_xlabel({"rotation": "degrees"}.get(kind, "factor"))
            ax.set_ylabel("test mean AUC (95% CI)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "robustness.png"), dpi=110)
        plt.close(fig)
        files["robustness"].append("robustness.png")

    with_curves = [r for r in runs if r.curves]
    if with_curves:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in with_curves:
            ax.plot(r.curves["steps"], [np.nan if v is None else v for v in r.curves["val_auc"]],
                    label=f"{r.name} (init {r.summary.get('init', '?')})")
        for c in convergence:
            ax.axhline(c["target_val_auc"], color="0.6", ls=":", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation mean AUC")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "convergence.png"), dpi=110)
        plt.close(fig)
        files["convergence"].append("convergence.png")
    return files


def _markdown(runs, boot, convergence, files, record_count) -> str:
    B = boot["num_resamples"]
    names = [r.name for r in runs]
    label_names = boot["label_names"]
    lines = ["# Paired evaluation report", ""]
    lines += [f"{record_count} test records ({runs[0].split or 'split unnamed'}), {len(label_names)} labels, "
              f"store `{runs[0].summary.get('store', {}).get('name', '') or '?'}` "
              f"(fingerprint `{runs[0].store_fingerprint or 'none'}`). Paired bootstrap: {B} resamples of the "
              f"test images, seed {boot['seed']}, the same resamples for every model; "
              f"{int(boot['confidence'] * 100)}% percentile CIs.", ""]
    lines += ["## Runs", "", "| model | mode | method | init | label fraction | workdir |", "|---|---|---|---|---|---|"]
    for r in runs:
        s = r.summary
        lines.append(f"| {r.name} | {s.get('mode', '')} | {s.get('method', '')} | {s.get('init', '')} | "
                     f"{s.get('label_fraction', '')} | `{r.workdir}` |")
    lines += ["", "## Mean AUC and operating-point metrics (macro over defined labels)", "",
              "Operating points at the decision thresholds chosen on the validation split ('validation'); a run "
              "without them is measured at the test split's own Youden point ('oracle': optimistic, chosen on "
              "the test images).", "",
              "| model | thresholds | mean AUC | accuracy | sensitivity | specificity | F1 |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        m = boot["models"][n]
        lines.append(f"| {n} | {m.get('threshold_source', 'oracle')} | {_ci(m['mean_auc'])} | " +
                     " | ".join(_ci(m["mean_youden"][k]) for k in metrics.YOUDEN_KEYS) + " |")
    if all("top1_accuracy" in boot["models"][n] for n in names):
        lines += ["", "## Top-1 accuracy (multi-class: one-hot labels; mean AUC above is the macro one-vs-rest "
                  "AUC)", "", "| model | top-1 accuracy [95% CI] |", "|---|---|"]
        lines += [f"| {n} | {_ci(boot['models'][n]['top1_accuracy'])} |" for n in names]
    lines += ["", "## Per-label AUC (95% CI)", "",
              "| label | positives / labelled | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    first = boot["models"][names[0]]["metrics"]["per_label"]
    for lname in label_names:
        cells = [_ci(boot["models"][n]["per_label"][lname]["auc"]) for n in names]
        lines.append(f"| {lname} | {first[lname]['n_pos']} / {first[lname]['n']} | " + " | ".join(cells) + " |")
    if files["roc"]:
        lines += ["", "![ROC curves](roc_all.png)", "",
                  "Per-label ROC plots: " + ", ".join(f"[{f}]({f})" for f in files["roc"][1:])]
    for c in boot["comparisons"]:
        a, b = c["a"], c["b"]
        lines += ["", f"## {a} vs {b}", "",
                  f"ΔAUC = AUC({a}) − AUC({b}). p({a} ≤ {b}) is the fraction of resamples in which {a} is "
                  f"not better (one-sided); BH = Benjamini–Hochberg over the labels. Verdict at 0.05 on the "
                  f"BH-adjusted values.", "",
                  f"| label | ΔAUC [95% CI] | p({a} ≤ {b}) | BH | p({b} ≤ {a}) | BH | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for lname in label_names:
            e = c["per_label"][lname]
            lines.append(f"| {lname} | {_ci(e['diff'])} | {bootstrap.format_p(e['p_a_not_better'], B)} | "
                         f"{bootstrap.format_p(e['p_a_not_better_bh'], B)} | "
                         f"{bootstrap.format_p(e['p_b_not_better'], B)} | "
                         f"{bootstrap.format_p(e['p_b_not_better_bh'], B)} | "
                         f"{_verdict(e['p_a_not_better_bh'], e['p_b_not_better_bh'], a, b)} |")
        m = c["mean_auc"]
        lines.append(f"| **mean AUC** | {_ci(m['diff'])} | {bootstrap.format_p(m['p_a_not_better'], B)} | – | "
                     f"{bootstrap.format_p(m['p_b_not_better'], B)} | – | "
                     f"{_verdict(m['p_a_not_better'], m['p_b_not_better'], a, b)} |")
        if "top1_accuracy" in c:
            t = c["top1_accuracy"]
            lines.append(f"| **top-1 accuracy** (Δ) | {_ci(t['diff'])} | {bootstrap.format_p(t['p_a_not_better'], B)}"
                         f" | – | {bootstrap.format_p(t['p_b_not_better'], B)} | – | "
                         f"{_verdict(t['p_a_not_better'], t['p_b_not_better'], a, b)} |")
    for n in names:
        m = boot["models"][n]
        if m.get("threshold_source") == "validation":
            how = ("Threshold = argmax(TPR − FPR) on the validation split, applied unchanged to the test set "
                   "and to every resample.")
        elif boot.get("youden_resampled"):
            how = ("Oracle: threshold = argmax(TPR − FPR) on the full test set itself (optimistic); CIs "
                   "recompute it in every resample.")
        else:
            how = "Oracle: threshold = argmax(TPR − FPR) on the full test set itself (CIs not resampled)."
        lines += ["", f"## Operating points: {n}", "", how, "",
                  "| label | threshold | accuracy | sensitivity | specificity | F1 |", "|---|---|---|---|---|---|"]
        for lname in label_names:
            pl = m["per_label"][lname]
            lines.append(f"| {lname} | {_fmt(m['metrics']['per_label'][lname]['threshold'], 4)} | " +
                         " | ".join(_ci(pl[k]) for k in metrics.YOUDEN_KEYS) + " |")
    if files["label_efficiency"]:
        lines += ["", "## Label efficiency", "", "![label efficiency](label_efficiency.png)", "",
                  "| model | fraction | mean AUC [95% CI] |", "|---|---|---|"]
        for r in runs:
            for e in r.label_fractions or []:
                lines.append(f"| {r.name} | {e['fraction']:g} | {_fmt(e['mean_auc'])} "
                             f"[{_fmt(e.get('ci_low'))}, {_fmt(e.get('ci_high'))}] |")
    if files["robustness"]:
        lines += ["", "## Robustness (test mean AUC under perturbation)", "", "![robustness](robustness.png)", ""]
        for kind in robustness.PERTURBATIONS:
            runs_k = [r for r in runs if r.robustness and kind in r.robustness]
            if not runs_k:
                continue
            strengths = sorted({e["strength"] for r in runs_k for e in r.robustness[kind]})
            lines += [f"| {kind} | " + " | ".join(f"{s:g}" for s in strengths) + " |",
                      "|---|" + "---|" * len(strengths)]
            for r in runs_k:
                by = {e["strength"]: e["mean_auc"] for e in r.robustness[kind]}
                lines.append(f"| {r.name} | " + " | ".join(_fmt(by.get(s)) for s in strengths) + " |")
            lines.append("")
    if files["convergence"]:
        lines += ["", "## Convergence", "", "![convergence](convergence.png)", "",
                  "Steps for the pretrained init to reach the random-init run's best validation AUC, as % "
                  "reduction of the random-init run's steps to that best (resolution: the eval interval).", ""]
        if convergence:
            lines += ["| pretrained | random init | target val AUC | steps (random) | steps (pretrained) | "
                      "reduction | both converged |", "|---|---|---|---|---|---|---|"]
            for c in convergence:
                red = "n/a" if c["reduction_pct"] is None else f"{c['reduction_pct']:.1f}%"
                both = {True: "yes", False: "no", None: "unknown"}[
                    None if None in (c.get("ssl_converged"), c.get("random_converged"))
                    else bool(c["ssl_converged"] and c["random_converged"])]
                lines.append(f"| {c['ssl']} | {c['random']} | {c['target_val_auc']:.4f} | {c['random_steps']:g} "
                             f"| {'never' if c['ssl_steps'] is None else format(c['ssl_steps'], 'g')} | {red} | "
                             f"{both} |")
            if any(c.get("random_converged") is False or c.get("ssl_converged") is False for c in convergence):
                lines += ["", "**Not comparable**: an arm stopped at its step limit while its validation AUC was "
                          "still improving (no early stop), so the reduction above is not a convergence figure. "
                          "Rerun with a larger total_steps."]
        else:
            lines.append("No run with init 'random' and validation curves: no reduction computed.")
    notes = list(boot["notes"])
    for n in names:
        notes += [f"{n}: {x}" for x in boot["models"][n]["metrics"]["notes"]]
    notes = list(dict.fromkeys(notes))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    lines += ["", "Replicates in which a label has one class only are excluded for that label; a replicate's "
              "mean AUC averages the labels defined in it. p = 0 is shown as < 1/B.", ""]
    return "\n".join(lines)


def _verdict(p_a, p_b, a, b, alpha=0.05) -> str:
    if p_a is None or p_b is None:
        return "n/a"
    if p_a <= alpha:
        return f"{a} better"
    if p_b <= alpha:
        return f"{b} better"
    return "n.s."


def compare_runs(workdirs: Sequence[str], out_dir: str, *, num_resamples: int = 1000, seed: int = 0,
                 youden_bootstrap: bool = True) -> dict:
    """Reads the eval workdirs, refuses mismatched runs, writes report.md, comparison.json and PNGs."""
    if not workdirs:
        raise ReportError("workdirs: give at least one evaluation workdir")
    runs = [read_eval(w) for w in workdirs]
    _unique_names(runs)
    record_ids, labels, probs = align_runs(runs)
    thresholds = {r.name: [None if np.isnan(t) else float(t) for t in r.thresholds]
                  for r in runs if r.thresholds is not None}
    boot = bootstrap.paired_bootstrap(probs=probs, labels=labels, label_names=runs[0].label_names,
                                      num_resamples=num_resamples, seed=seed, youden=youden_bootstrap,
                                      thresholds=thresholds)
    convergence = _convergence(runs)
    os.makedirs(out_dir, exist_ok=True)
    files = _plots(out_dir, runs, labels, probs, runs[0].label_names, convergence, boot)
    comparison = {
        "format": "medssl_jax.comparison", "version": 1,
        "runs": [{"name": r.name, "workdir": r.workdir,
                  **{k: r.summary.get(k) for k in ("mode", "method", "init", "label_fraction", "split", "store")}}
                 for r in runs],
        "num_records": int(len(record_ids)),
        "bootstrap": boot,
        "convergence": convergence,
        "label_efficiency": {r.name: r.label_fractions for r in runs if r.label_fractions},
        "robustness": {r.name: r.robustness for r in runs if r.robustness},
        "files": files,
    }
    _write_json(os.path.join(out_dir, "comparison.json"), comparison)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(runs, boot, convergence, files, len(record_ids)))
    return comparison
