"""The command line of `python -m medssl_jax.ingest` (see medssl_jax/ingest.py for what it writes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medssl_jax.data.ingest.arguments import build_parser
from medssl_jax.data.ingest.benchmark import benchmark
from medssl_jax.data.ingest.run import load_or_make_salt, run_ingest, summary_line, verify_store
from medssl_jax.data.ingest.tasks import REPORT_FILE, IngestError, hash_key


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark:
        try:
            w = (tuple(int(v) for v in args.bench_workers.split(",")) if args.bench_workers
                 else (args.workers,) if args.workers else None)
        except ValueError:
            parser.error(f"--bench-workers={args.bench_workers}: use integers like 1,2,4")
        rows = benchmark(n_files=args.bench_files, workers=w)
        for r in rows:
            print(f"benchmark: {r['syntax']:>12}  workers={r['workers']}  end-to-end "
                  f"{r['files_per_s']:6.1f} files/s ({r['files']} files in {r['seconds']} s, "
                  f"first result after {r['startup_s']} s)  steady {r['files_per_s_steady']:6.1f} "
                  f"files/s = {r['files_per_s_steady_per_worker']:.1f} per worker; CPU ms/file "
                  f"main {r['cpu_ms_per_file_main']} workers {r['cpu_ms_per_file_workers']}")
        print(json.dumps(rows))
        return 0
    if args.verify:
        return verify_store(args.verify, quiet=args.quiet)
    if not (args.input or args.csv or args.medmnist or args.tfds):
        parser.error("give --input=DIR (DICOM), --csv=FILE (with --image-root), --medmnist=FILE.npz, "
                     "--tfds=NAME/CONFIG, or --benchmark")
    if not args.output:
        parser.error("--output=STORE is required")
    if args.medmnist and args.preprocess != "none":
        parser.error(f"--preprocess={args.preprocess} applies to --input/--csv images, not to --medmnist "
                     "(MedMNIST ships its own resized images)")
    if args.medmnist:
        from medssl_jax.data import medmnist

        names = tuple(n.strip() for n in args.label_names.split(",")) if args.label_names else None
        try:
            report = medmnist.write_store(args.medmnist, args.output, task=args.medmnist_task, label_names=names,
                                          name=args.name, overwrite=args.overwrite)
        except medmnist.MedMNISTError as e:
            print(f"ingest: error: {e}", file=sys.stderr)
            return 2
        print(f"ingest: {args.medmnist} ({report['subset'] or 'unknown subset'}, {report['task']}): "
              + ", ".join(f"{s} {n}" for s, n in report["records"].items())
              + f" images, labels {report['label_names']} -> {args.output}")
        return 0
    if args.tfds:
        return _tfds_main(args, parser)
    try:
        report = run_ingest(args)
    except IngestError as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ingest: interrupted; no store was written (a rerun starts over)", file=sys.stderr)
        return 130
    print(summary_line(report, args.output))
    if report["num_skipped"] and not args.allow_skips:
        print(f"ingest: {report['num_skipped']} files skipped (see {args.output}/{REPORT_FILE}); "
              "pass --allow-skips to accept", file=sys.stderr)
        return 1
    return 0


def _tfds_main(args, parser) -> int:
    from medssl_jax.data.tfds import to_store

    if not args.tfds_data_dir:
        parser.error("--tfds needs --tfds-data-dir=DIR (where the builder was prepared)")
    if args.preprocess != "none" and args.size < 1:
        parser.error(f"--preprocess={args.preprocess}: needs the square target size (--size >= 1, got {args.size})")
    output = Path(args.output).absolute()
    try:
        report = to_store.write_store(args.tfds, data_dir=args.tfds_data_dir, output=output,
                                      salt=load_or_make_salt(args, output), hash_key=hash_key,
                                      overwrite=args.overwrite, store_name=args.name, preprocess=args.preprocess,
                                      size=args.size)
    except (to_store.TfdsIngestError, IngestError) as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    print(f"ingest: {args.tfds} -> {args.output}: " + ", ".join(f"{s} {n}" for s, n in report["records"].items())
          + f" images, labels {report['label_names']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
