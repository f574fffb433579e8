"""The paired-comparison report: `compare_runs` reads several evaluation runs (records.py), refuses
unless they hold the same test records and labels of the same store, runs the paired bootstrap and
writes `R/report.md`, `R/comparison.json` and PNG plots (ROC per label, label efficiency, robustness,
convergence).
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, Sequence

import numpy as np

from medssl_jax import jsonio
from medssl_jax.evaluate import bootstrap, metrics, robustness
from medssl_jax.evaluate.records import EvalRun, ReportError, align_runs, read_eval


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


def _save(fig, out_dir: str, name: str, *, dpi: int) -> None:
    """Lays out, writes and closes one figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=dpi)
    plt.close(fig)


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
        _save(fig, out_dir, fname, dpi=110)
        files["roc"].append(fname)
    cols = min(4, len(label_names))
    rows = math.ceil(len(label_names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for j, lname in enumerate(label_names):
        roc_axes(axes[j // cols][j % cols], j, lname)
    for k in range(len(label_names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    _save(fig, out_dir, "roc_all.png", dpi=90)
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
        _save(fig, out_dir, "label_efficiency.png", dpi=110)
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
        _save(fig, out_dir, "robustness.png", dpi=110)
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
        _save(fig, out_dir, "convergence.png", dpi=110)
        files["convergence"].append("convergence.png")
    return files


def _comparison_lines(c, label_names, B) -> list[str]:
    """The per-label and mean-AUC table of one paired comparison."""
    a, b = c["a"], c["b"]
    lines = ["", f"## {a} vs {b}", "",
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
                     f"{bootstrap.verdict(e['p_a_not_better_bh'], e['p_b_not_better_bh'], a, b)} |")
    m = c["mean_auc"]
    lines.append(f"| **mean AUC** | {_ci(m['diff'])} | {bootstrap.format_p(m['p_a_not_better'], B)} | – | "
                 f"{bootstrap.format_p(m['p_b_not_better'], B)} | – | "
                 f"{bootstrap.verdict(m['p_a_not_better'], m['p_b_not_better'], a, b)} |")
    if "top1_accuracy" in c:
        t = c["top1_accuracy"]
        lines.append(f"| **top-1 accuracy** (Δ) | {_ci(t['diff'])} | {bootstrap.format_p(t['p_a_not_better'], B)}"
                     f" | – | {bootstrap.format_p(t['p_b_not_better'], B)} | – | "
                     f"{bootstrap.verdict(t['p_a_not_better'], t['p_b_not_better'], a, b)} |")
    return lines


def _convergence_lines(convergence) -> list[str]:
    """Ghesu's convergence table: steps the pretrained init needs to reach the random init's best."""
    lines = ["", "## Convergence", "", "![convergence](convergence.png)", "",
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
    return lines


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
        lines += _comparison_lines(c, label_names, B)
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
        lines += _convergence_lines(convergence)
    notes = list(boot["notes"])
    for n in names:
        notes += [f"{n}: {x}" for x in boot["models"][n]["metrics"]["notes"]]
    notes = list(dict.fromkeys(notes))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    lines += ["", "Replicates in which a label has one class only are excluded for that label; a replicate's "
              "mean AUC averages the labels defined in it. p = 0 is shown as < 1/B.", ""]
    return "\n".join(lines)


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
    jsonio.write_json(os.path.join(out_dir, "comparison.json"), comparison)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(runs, boot, convergence, files, len(record_ids)))
    return comparison
