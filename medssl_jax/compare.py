"""Paired comparison of evaluation runs: `python -m medssl_jax.compare E1 E2 [E3 ...] --out=R`.

Each E is an evaluation workdir holding E/eval/ (its layout is in medssl_jax/evaluate/records.py, which
writes and reads it). The runs must be on the same store, split, test records and labels;
otherwise the command stops with one line saying which runs differ and how. Writes R/report.md,
R/comparison.json (every number) and PNG plots.
"""
from __future__ import annotations

import argparse
import sys
import time

from medssl_jax.evaluate import bootstrap, records, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medssl_jax.compare",
                                     description="Paired bootstrap comparison of evaluation workdirs.")
    parser.add_argument("workdirs", nargs="+", help="evaluation workdirs (each with eval/summary.json)")
    parser.add_argument("--out", required=True, help="report directory (created)")
    parser.add_argument("--num_resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--no_youden_bootstrap", action="store_true",
                        help="resample AUC only (Youden metrics then get point estimates without CIs)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        comparison = report.compare_runs(args.workdirs, args.out, num_resamples=args.num_resamples,
                                         seed=args.seed, youden_bootstrap=not args.no_youden_bootstrap)
    except (records.ReportError, bootstrap.BootstrapError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    boot = comparison["bootstrap"]
    for name, m in boot["models"].items():
        s = m["mean_auc"]
        ci = "" if s["ci_low"] is None else f" [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
        auc = "undefined" if s["point"] is None else f"{s['point']:.4f}"
        print(f"{name}: mean AUC {auc}{ci}")
    for c in boot["comparisons"]:
        p = bootstrap.format_p(c["mean_auc"]["p_a_not_better"], boot["num_resamples"])
        print(f"{c['a']} vs {c['b']}: p({c['a']} not better) = {p}")
    print(f"wrote {args.out}/report.md and comparison.json ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
