"""`config.mode = 'transfer'`: the whole transfer study of several initialisations in one command.

    python -m medssl_jax.main --config=configs/transfer.py:runlocal,store=S \
        --config.inits="('RUN/export', 'random')" --workdir=W

For every init (an export, a converted checkpoint or 'random') and every arm (`arms`: the linear probe and
fine-tuning), at every label fraction, on the same patient-wise splits:
  W/linear_probe/<name>/   configs/linear_probe.py's evaluation (C chosen on validation, one fit per fraction;
                           a random ResNet also its residual-branch init, `random_zero_init_grid`)
  W/finetune/<name>/       evaluate/finetune.py's protocol (each init its own grid on validation, seeds)
then the analysis:
  W/transfer.json  per init, arm and fraction: the grid, the choice, per-seed test AUCs, their mean and
                   spread and a CI over test images and seeds; for each pair of inits and each arm and
                   fraction: the difference of mean AUC, its 95 % CI, one-sided p-values and their
                   Benjamini-Hochberg adjustment over the fractions; the convergence figure; and per
                   label ("per_label"): each init's AUC with its CI, and each pair's difference, CI and
                   p-values on the same replicates, Benjamini-Hochberg adjusted over the labels.
  W/report.md, W/label_efficiency.png, W/convergence.png
With `read_test=False` the study stops after the choices: the arms never predict the test split, and
transfer.json / report.md hold each chosen setting and its validation score (no test AUC, no comparison;
the convergence figure, which reads validation curves only, is kept). Rerunning with `read_test=True`
reads test once: every fine-tuning run is read back, only the test predictions are new.
The interval of a difference covers test-sample and seed noise: `bootstrap.seed_and_image_bootstrap`.
Convergence (Ghesu et al.): on each fraction's chosen fine-tuning settings, the steps a pretrained init
needs to reach the random init's best validation AUC (mean curve over seeds), as a share of the steps the
random init needed. Every step is resumable: rerunning the command skips finished evaluations and resumes
an interrupted fine-tune. An evaluation counts as finished only under the config it ran with
(W/<arm>/<name>/study_arm_config.json); after a change it runs again, and fine-tuning reads back only the
runs trained with exactly the settings it would use now (evaluate/finetune.py: check_same_run).
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402

from medssl_jax import config_lib, jsonio, logging_lib  # noqa: E402
from medssl_jax.data import sources  # noqa: E402
from medssl_jax.evaluate import bootstrap, encoders, finetune, linear_probe, records, robustness  # noqa: E402
from medssl_jax.evaluate import splits as splits_lib  # noqa: E402

ARMS = ("linear_probe", "finetune")
# Fields set once for the study and copied into both arms' configs (the same store, splits and fractions).
SHARED = ("seed", "data", "splits", "label_fractions", "image_size", "mesh", "compute_dtype", "input_normalization",
          "read_test")
VERDICT_ALPHA = 0.025  # per direction: the two one-sided tests together are a two-sided 5 % test
PER_LABEL_P = ("p_a_not_better", "p_a_not_better_bh", "p_b_not_better", "p_b_not_better_bh")


def reference_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.mode = "transfer"
    c.seed = 0
    c.inits = ()  # exports (RUN/export), converted checkpoints, or 'random'
    c.names = ()  # display names, one per init ('' or () = derived from the path)
    c.arms = ARMS
    c.label_fractions = (0.01, 0.1, 0.25, 1.0)
    c.num_resamples = 1000
    base = config_lib.eval_config()
    for field in SHARED:
        if field not in ("seed", "label_fractions"):
            c[field] = base[field]
    c.model = None  # the architecture of the 'random' init (both arms)
    c.linear_probe = linear_probe.reference_config()
    c.finetune = finetune.reference_config()
    return c


def init_names(inits, names=()) -> list[str]:
    """Display names: given ones, else 'random' or the export folder's name (its parent for RUN/export)."""
    if names and len(names) != len(inits):
        raise ValueError(f"config.names has {len(names)} entries for {len(inits)} inits")
    out = []
    for i, init in enumerate(inits):
        name = (names[i] if names else "") or (
            "random" if init == "random" else os.path.basename(os.path.normpath(init)))
        if not names and name == "export":
            name = os.path.basename(os.path.dirname(os.path.normpath(init)))
        base, k = name, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


def arm_config(config, arm: str, init: str) -> mlc.ConfigDict:
    c = mlc.ConfigDict(config[arm].to_dict())
    for field in SHARED:
        value = config[field]
        c[field] = mlc.ConfigDict(value.to_dict()) if isinstance(value, mlc.ConfigDict) else value
    c.init = init
    if init == "random":
        # The probe fits a random ResNet with both residual-branch inits and keeps the better one on validation
        # (linear_probe.random_zero_init_grid); a fine-tune from scratch starts like pretraining (config.model).
        c.model = mlc.ConfigDict(dict(config.model))
    c.name = ""
    return c


def validate(config) -> None:
    if len(config.inits) < 1:
        raise ValueError("config.inits is empty: give one or more of RUN/export, a converted checkpoint, 'random'")
    bad = [a for a in config.arms if a not in ARMS]
    if bad or not config.arms:
        raise ValueError(f"config.arms={tuple(config.arms)!r}: choose from {ARMS}")
    if len(set(config.inits)) != len(config.inits):
        raise ValueError(f"config.inits={tuple(config.inits)!r} has duplicates")
    if "random" in config.inits and not config.model:
        raise ValueError("config.inits has 'random': config.model must give its architecture")
    if config.num_resamples < 1:
        raise ValueError(f"config.num_resamples={config.num_resamples}: must be >= 1")
    splits_lib.check_fractions(config.label_fractions)
    for init in config.inits:
        for arm in config.arms:
            c = arm_config(config, arm, init)
            config_lib.validate_eval(c)
            encoders.check_init(c)
            if arm == "finetune":
                finetune.validate(c)


def _with_store_image_size(config, store):
    """image_size -1: the stored images' size (their longest side; MedMNIST 28, the runlocal phantoms 64)."""
    first = store[int(store.ids(config.splits.train)[0])]["image"]
    config = mlc.ConfigDict(config.to_dict())
    config.image_size = int(max(first.shape[:2]))
    logging_lib.log(f"image_size: {config.image_size} (the stored images' size)")
    return config


ARM_CONFIG_FILE = "study_arm_config.json"


def _done(workdir: str, arm: str, fractions: list[float], arm_config) -> bool:
    """Whether `arm` finished in `workdir` at every fraction of this study under the same config (a study
    rerun with more fractions or a wider grid evaluates again; fine-tuning then reads back the finished runs
    whose own config is unchanged and stops on one that differs)."""
    # A validation-only evaluation (read_test=False) writes no E/eval; its record is validation.json or
    # finetune.json (the stored arm config below tells the two kinds of run apart).
    marker = (os.path.join("eval", "summary.json") if arm_config.read_test
              else "finetune.json" if arm == "finetune" else records.VALIDATION_FILE)
    if not os.path.exists(os.path.join(workdir, marker)):
        return False
    stored = os.path.join(workdir, ARM_CONFIG_FILE)
    if not os.path.exists(stored):
        return False
    with open(stored) as f:
        if json.load(f) != records.json_value(arm_config.to_dict()):
            return False
    if arm == "finetune":
        with open(os.path.join(workdir, "finetune.json")) as f:
            done = [float(r["fraction"]) for r in json.load(f)["fractions"]]
    elif not arm_config.read_test:
        done = list(linear_probe.read_validation_only(workdir))
    else:
        path = os.path.join(workdir, "eval", "label_fractions.json")
        if os.path.exists(path):
            with open(path) as f:
                done = [float(e["fraction"]) for e in json.load(f)["fractions"]]
        else:
            with open(os.path.join(workdir, "eval", "summary.json")) as f:
                done = [float(json.load(f)["label_fraction"])]
    return sorted(done) == sorted(fractions)


def _seed_predictions(workdir: str, arm: str, fraction: float, num_fractions: int) -> dict:
    """{"probs": [S, N, L], "labels", "record_ids"} of one arm's evaluation at one fraction."""
    if arm == "finetune":
        return finetune.read_seed_predictions(workdir, fraction)
    run = records.read_eval(workdir if num_fractions == 1 else os.path.join(workdir, "fractions", f"f{fraction:g}"))
    return {"probs": run.probs[None], "labels": run.labels, "record_ids": run.record_ids}


def run(config, workdir: str) -> dict | None:
    """Runs the study of the module docstring; returns transfer.json's dict (None when a SIGTERM stopped it)."""
    store = sources.open_store(config.data)  # opened once; every arm of every init reads it
    if config.image_size == -1:
        config = _with_store_image_size(config, store)
    validate(config)
    workdir = os.path.abspath(workdir)
    names = init_names(list(config.inits), list(config.names))
    fractions = splits_lib.check_fractions(config.label_fractions)
    dirs = {}
    for init, name in zip(config.inits, names):
        for arm in config.arms:
            out = os.path.join(workdir, arm, name)
            dirs[arm, name] = out
            arm_cfg = arm_config(config, arm, init)
            if _done(out, arm, fractions, arm_cfg):
                logging_lib.log(f"{arm} of {name}: done earlier ({out})")
                continue
            logging_lib.log(f"=== {arm} of {name} ({init}) -> {out}")
            module = finetune if arm == "finetune" else linear_probe
            if module.run(arm_cfg, out, store=store) is None:  # SIGTERM: the run saved and stopped
                logging_lib.log("transfer study stopped; rerun the same command to resume")
                return None
            if jax.process_index() == 0:
                jsonio.write_json(os.path.join(out, ARM_CONFIG_FILE), records.json_value(arm_cfg.to_dict()))

    result = analyse(config, names, dirs, fractions, label_names=list(store.label_names))
    jsonio.write_json(os.path.join(workdir, "transfer.json"), result)
    files = plot(result, workdir)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown(result, files))
    logging_lib.log(summary_lines(result))
    logging_lib.log(f"wrote {os.path.join(workdir, 'transfer.json')} and {os.path.join(workdir, 'report.md')}")
    return result


def analyse(config, names: list[str], dirs: dict, fractions: list[float], *, label_names: list[str]) -> dict:
    """transfer.json's content from the finished evaluations (see the module docstring); with
    read_test=False the choices and validation scores alone (no test AUC, no comparison)."""
    arms = list(config.arms)
    out = {"inits": dict(zip(names, config.inits)), "arms": arms, "fractions": fractions, "labels": label_names,
           "read_test": bool(config.read_test), "num_resamples": int(config.num_resamples), "results": [],
           "comparisons": [], "convergence": []}
    preds = {}
    if config.read_test:
        for arm in arms:
            for name in names:
                for fraction in fractions:
                    preds[arm, name, fraction] = _seed_predictions(dirs[arm, name], arm, fraction, len(fractions))
        reference = preds[arms[0], names[0], fractions[0]]
        for key, value in preds.items():
            if not np.array_equal(value["record_ids"], reference["record_ids"]):
                raise ValueError(f"{key[0]} of {key[1]} at fraction {key[2]:g} was evaluated on other test records "
                                 f"than {arms[0]} of {names[0]}: different splits (rerun in a new workdir)")
        boot = dict(labels=reference["labels"], num_resamples=config.num_resamples, seed=config.seed)

    for arm in arms:
        for name in names:
            fine = _finetune_record(dirs[arm, name]) if arm == "finetune" else None
            probe_val = (linear_probe.read_validation_only(dirs[arm, name])
                         if arm == "linear_probe" and not config.read_test else None)
            for fraction in fractions:
                entry = {"init": name, "arm": arm, "fraction": fraction, "mean_auc": None, "ci_low": None,
                         "ci_high": None}
                if config.read_test:
                    res = bootstrap.seed_and_image_bootstrap(probs_a=preds[arm, name, fraction]["probs"], **boot)
                    entry.update(_interval(res["a"]), per_label={
                        label: _interval(e["a"]) for label, e in zip(label_names, res["per_label"])})
                if fine is not None:
                    record = fine[fraction]
                    entry.update({k: record[k] for k in ("grid", "chosen", "seeds", "test_mean_auc_spread",
                                                         "num_train", "batch_size", "val_curve")})
                    entry["val_score"] = record["chosen"]["score"]
                else:
                    fit = probe_val[fraction] if probe_val is not None else records.read_eval(
                        dirs[arm, name] if len(fractions) == 1
                        else os.path.join(dirs[arm, name], "fractions", f"f{fraction:g}")).summary["extra"]
                    choice = fit.get("random_init_choice")  # a random ResNet's residual init
                    grid = fit.get("val_mean_auc_by_c")
                    entry.update({"chosen": {"c": fit.get("c"),
                                             **({"zero_init_last_bn": choice["zero_init_last_bn"]} if choice else {})},
                                  "grid": grid,
                                  **({"random_init_grid": choice["val_mean_auc"]} if choice else {}),
                                  "num_train": fit.get("num_train"),
                                  "val_score": grid.get(f"{fit['c']:g}") if grid and fit.get("c") is not None
                                  else None})
                out["results"].append(entry)
        if not config.read_test:
            continue
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                rows = []
                for fraction in fractions:
                    res = bootstrap.seed_and_image_bootstrap(probs_a=preds[arm, a, fraction]["probs"],
                                                             probs_b=preds[arm, b, fraction]["probs"], **boot)
                    rows.append({"a": a, "b": b, "arm": arm, "fraction": fraction, "diff": res["diff"]["point"],
                                 "ci_low": res["diff"]["ci_low"], "ci_high": res["diff"]["ci_high"],
                                 "p_a_not_better": res["p_a_not_better"], "p_b_not_better": res["p_b_not_better"],
                                 "num_seeds": res["num_seeds"],
                                 "per_label": {label: {"diff": e["diff"]["point"], "ci_low": e["diff"]["ci_low"],
                                                       "ci_high": e["diff"]["ci_high"],
                                                       **{k: e[k] for k in PER_LABEL_P}}
                                               for label, e in zip(label_names, res["per_label"])}})
                for key in ("p_a_not_better", "p_b_not_better"):
                    for row, q in zip(rows, bootstrap.benjamini_hochberg([r[key] for r in rows])):
                        row[key + "_bh"] = q
                out["comparisons"].extend(rows)
    if "finetune" in arms and "random" in config.inits:
        rand = names[list(config.inits).index("random")]
        for name in names:
            if name == rand:
                continue
            for fraction in fractions:
                curves = {n: _result(out, n, "finetune", fraction)["val_curve"] for n in (name, rand)}
                try:
                    res = robustness.convergence_reduction(ssl_curve=curves[name], random_curve=curves[rand])
                except robustness.RobustnessError as error:
                    res = {"note": str(error), "reduction_pct": None, "ssl_steps": None, "random_steps": None}
                share = (res["ssl_steps"] / res["random_steps"] if res.get("ssl_steps") is not None
                         and res.get("random_steps") else None)
                out["convergence"].append({"init": name, "random": rand, "fraction": fraction, **res,
                                           "share_of_random_steps": share})
    return out


def _interval(summary: dict) -> dict:
    return {"mean_auc": summary["point"], "ci_low": summary["ci_low"], "ci_high": summary["ci_high"]}


def _finetune_record(workdir: str) -> dict:
    with open(os.path.join(workdir, "finetune.json")) as f:
        return {float(r["fraction"]): r for r in json.load(f)["fractions"]}


def _result(result: dict, init: str, arm: str, fraction: float) -> dict:
    return next(r for r in result["results"] if (r["init"], r["arm"], r["fraction"]) == (init, arm, fraction))


def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _p(value) -> str:
    return "n/a" if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _verdict(p_values: dict, a: str, b: str) -> str:
    """a - b's verdict from the BH-adjusted one-sided p-values of a comparison or of one of its labels, each
    direction at 0.025: a two-sided 5 % test, so that "better" agrees with a 95 % CI that excludes 0."""
    return bootstrap.verdict(p_values.get("p_a_not_better_bh"), p_values.get("p_b_not_better_bh"), a, b,
                             alpha=VERDICT_ALPHA)


def summary_lines(result: dict) -> str:
    lines = []
    for row in result["comparisons"]:
        lines.append(f"{row['arm']} {row['fraction']:g}: {row['a']} - {row['b']} {_fmt(row['diff'], '+.3f')} "
                     f"[95% CI {_fmt(row['ci_low'], '+.3f')}, {_fmt(row['ci_high'], '+.3f')}], "
                     f"p({row['a']} not better) {_p(row['p_a_not_better'])} / BH {_p(row['p_a_not_better_bh'])}, "
                     f"p({row['b']} not better) {_p(row['p_b_not_better'])} / BH {_p(row['p_b_not_better_bh'])}: "
                     f"{_verdict(row, row['a'], row['b'])}")
    return "\n".join(lines)


def plot(result: dict, workdir: str) -> list[str]:
    """label_efficiency.png (mean AUC against label fraction, log x, CI bands) and convergence.png."""
    files = []
    read_test = result.get("read_test", True)
    key = "mean_auc" if read_test else "val_score"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in result["arms"]:
        for name in result["inits"]:
            rows = [_result(result, name, arm, f) for f in result["fractions"]]
            x = [r["fraction"] * 100 for r in rows]
            y = [np.nan if r[key] is None else r[key] for r in rows]
            line, = ax.plot(x, y, marker="o", linestyle="-" if arm == "finetune" else "--", label=f"{name}, {arm}")
            if read_test:
                lo = [np.nan if r["ci_low"] is None else r["ci_low"] for r in rows]
                hi = [np.nan if r["ci_high"] is None else r["ci_high"] for r in rows]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    files.append(_save(fig, ax, workdir, "label_efficiency.png",
                       ylabel="test mean AUC (mean over seeds, 95% CI)" if read_test
                       else "validation mean AUC of the chosen setting",
                       title="Label efficiency" if read_test else "Label efficiency on validation (test not read)",
                       fractions=result["fractions"]))
    if result["convergence"]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name in dict.fromkeys(r["init"] for r in result["convergence"]):
            rows = [r for r in result["convergence"] if r["init"] == name]
            ax.plot([r["fraction"] * 100 for r in rows],
                    [np.nan if r["share_of_random_steps"] is None else 100 * r["share_of_random_steps"] for r in rows],
                    marker="o", label=name)
        ax.axhline(100, color="grey", linewidth=1)
        files.append(_save(fig, ax, workdir, "convergence.png", title="Convergence (fine-tuning)",
                           ylabel="steps to random init's best val AUC (% of random's)",
                           fractions=result["fractions"]))
    return files


def _save(fig, ax, workdir: str, name: str, *, ylabel: str, title: str, fractions) -> str:
    ax.set_xscale("log")
    # Explicit limits: a curve of undefined points (no convergence reached) leaves the log axis no data.
    ax.set_xlim(min(fractions) * 100 / 1.3, max(fractions) * 100 * 1.3)
    ax.set_xlabel("label fraction (% of train patients)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, name), dpi=120)
    plt.close(fig)
    return name


def markdown(result: dict, files: list[str]) -> str:
    if not result.get("read_test", True):
        return _markdown_validation_only(result, files)
    def cell(r):
        text = f"{_fmt(r['mean_auc'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        if r["arm"] == "finetune":
            return text + f" ({r['chosen']['name']}, spread {_fmt(r['test_mean_auc_spread'])})"
        if "zero_init_last_bn" in r["chosen"]:  # a random ResNet probe's residual-branch init
            return text + f" (residual branches {'zero-init' if r['chosen']['zero_init_last_bn'] else 'active'})"
        return text

    lines = ["# Transfer study", "", _inits_line(result),
             "Mean AUC over seeds on the test split; 95 % CIs resample test images and seeds "
             f"({result['num_resamples']} replicates). Every setting was chosen on the validation split.", "",
             "## Mean test AUC", ""] + _per_init_table(result, cell)
    if result["comparisons"]:
        lines += ["", "## Differences (a - b)", "",
                  "One-sided bootstrap p-values in both directions, each Benjamini-Hochberg adjusted over the "
                  "fractions of its arm; the verdict reads the adjusted ones at 0.025 each (two-sided 5 %, like "
                  "the 95 % CI).", "",
                  "| arm | a | b | fraction | difference [95% CI] | p(a not better) | BH | p(b not better) | BH "
                  "| verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["comparisons"]:
            lines.append(f"| {r['arm']} | {r['a']} | {r['b']} | {r['fraction']:g} | {_fmt(r['diff'], '+.3f')} "
                         f"[{_fmt(r['ci_low'], '+.3f')}, {_fmt(r['ci_high'], '+.3f')}] | {_p(r['p_a_not_better'])} "
                         f"| {_p(r['p_a_not_better_bh'])} | {_p(r['p_b_not_better'])} | {_p(r['p_b_not_better_bh'])} "
                         f"| {_verdict(r, r['a'], r['b'])} |")
    lines += _markdown_per_label(result)
    return "\n".join(lines + _markdown_convergence(result) + [""] + [f"![{f}]({f})" for f in files] + [""])


def _markdown_per_label(result: dict) -> list[str]:
    """One row per arm, fraction and label: each init's test AUC and each pair's difference, p BH over labels."""
    labels, names = result.get("labels") or [], list(result["inits"])
    if not labels:
        return []
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    lines = ["", "## Per label", "",
             "Test AUC per label (mean over seeds [95% CI]) and each pair's difference on the same replicates; "
             "both one-sided p-values (a not better, b not better) are Benjamini-Hochberg adjusted over the labels "
             "of that arm and fraction, and the verdict reads them at 0.025 each (two-sided 5 %).", "",
             "| arm | fraction | label | " + " | ".join(names)
             + "".join(f" | {a} - {b} [95% CI] | p(a not better), BH | p(b not better), BH | verdict"
                       for a, b in pairs) + " |",
             "|---|---|---|" + "---|" * (len(names) + 4 * len(pairs))]
    for arm in result["arms"]:
        for fraction in result["fractions"]:
            rows = {n: _result(result, n, arm, fraction).get("per_label") or {} for n in names}
            diffs = {(r["a"], r["b"]): r.get("per_label") or {} for r in result["comparisons"]
                     if (r["arm"], r["fraction"]) == (arm, fraction)}
            for label in labels:
                cells = []
                for n in names:
                    e = rows[n].get(label, {})
                    cells.append(f"{_fmt(e.get('mean_auc'))} [{_fmt(e.get('ci_low'))}, {_fmt(e.get('ci_high'))}]")
                for pair in pairs:
                    e = diffs.get(pair, {}).get(label, {})
                    cells.append(f"{_fmt(e.get('diff'), '+.3f')} [{_fmt(e.get('ci_low'), '+.3f')}, "
                                 f"{_fmt(e.get('ci_high'), '+.3f')}]")
                    cells += [_p(e.get("p_a_not_better_bh")), _p(e.get("p_b_not_better_bh")),
                              _verdict(e, *pair)]
                lines.append(f"| {arm} | {fraction:g} | {label} | " + " | ".join(cells) + " |")
    return lines


def _markdown_validation_only(result: dict, files: list[str]) -> str:
    def cell(r):
        chosen = r["chosen"]["name"] if r["arm"] == "finetune" else f"C {_fmt(r['chosen']['c'], 'g')}"
        return f"{_fmt(r['val_score'])} ({chosen})"

    lines = ["# Transfer study (validation only)", "", _inits_line(result),
             "Run with `read_test=False`: every setting was chosen on the validation split and **the test split "
             "was not read**. The same command with `--config.read_test=True` reads it once, reusing every run.", "",
             "## Validation mean AUC of the chosen setting", "",
             "Fine-tuning: the chosen setting's mean score over its seeds; linear probe: the chosen C's AUC.", ""]
    lines += _per_init_table(result, cell)
    return "\n".join(lines + _markdown_convergence(result) + [""] + [f"![{f}]({f})" for f in files] + [""])


def _inits_line(result: dict) -> str:
    return "Inits: " + ", ".join(f"`{n}` ({p})" for n, p in result["inits"].items()) + "."


def _per_init_table(result: dict, cell) -> list[str]:
    """One row per arm and init, one column per label fraction; `cell(entry)` writes each."""
    fractions = result["fractions"]
    lines = ["| arm | init | " + " | ".join(f"{f:g}" for f in fractions) + " |", "|---|---|" + "---|" * len(fractions)]
    for arm in result["arms"]:
        for name in result["inits"]:
            cells = [cell(_result(result, name, arm, f)) for f in fractions]
            lines.append(f"| {arm} | {name} | " + " | ".join(cells) + " |")
    return lines


def _markdown_convergence(result: dict) -> list[str]:
    lines = []
    if result["convergence"]:
        lines += ["", "## Convergence (fine-tuning)", "",
                  "Steps to reach the random init's best validation AUC, as a share of the random init's steps "
                  "(mean validation curve over seeds of each chosen setting).", "",
                  "| init | fraction | target val AUC | steps | random's steps | share | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["convergence"]:
            lines.append(f"| {r['init']} | {r['fraction']:g} | {_fmt(r.get('target_val_auc'))} | "
                         f"{_fmt(r['ssl_steps'], '.0f')} | {_fmt(r['random_steps'], '.0f')} | "
                         f"{_fmt(r['share_of_random_steps'], '.0%')} | {r.get('note') or ''} |")
    return lines
