"""Entry point: `python -m medssl_jax.main --config=configs/micle.py[:args] --workdir=DIR`.

Dispatches on `config.mode`: 'pretrain' trains (or resumes) an SSL method, exports the encoder to
WORKDIR/export and runs the linear probe into WORKDIR/eval/summary.json. Failures a user can fix (bad
store, config typo, batch not divisible by the devices, non-finite loss) end with one line on stderr and
exit code 1; set MEDSSL_DEBUG=1 to get the traceback instead.

Multi-host (Cloud TPU slice, multi-node GPU): set MEDSSL_DISTRIBUTED=1 (the launch/ scripts do) and
`jax.distributed.initialize()` runs before anything touches a device. It finds the coordinator, process
count and id itself on TPU VMs and under SLURM/Open MPI; elsewhere (several processes on one machine, a
plain cluster) give JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/micle.py:runlocal", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, export and eval results.")
flags.mark_flags_as_required(["config", "workdir"])


def reference_config(config):
    """The full set of fields a config of this mode/method may have (to reject typos)."""
    from medssl_jax import config_lib, methods

    if config.get("mode", "pretrain") != "pretrain":
        module = __import__(f"medssl_jax.evaluate.{config.mode}", fromlist=["reference_config"])
        return module.reference_config()
    reference = config_lib.pretrain_config()
    reference.method = config.get("method", reference.method)
    methods.get(reference.method).extend_config(reference)
    model = config.get("model")
    name = model.get("name") if model else None
    if name and name != reference.model.get("name"):
        # Another encoder than the method's default (e.g. DINO with a ResNet): check against its own fields.
        import ml_collections as mlc

        from medssl_jax import models

        reference.model = mlc.ConfigDict(models.encoder_fields(name))
    return reference


def run(config, workdir: str) -> dict | None:
    """Runs the configured job; returns the evaluation summary (None when stopped early)."""
    import jax

    from medssl_jax import config_lib, logging_lib, train
    from medssl_jax.data import sources
    from medssl_jax.evaluate import after_pretraining

    if config.mode not in config_lib.MODES:
        raise ValueError(f"config.mode={config.mode!r} is not one of {config_lib.MODES}")
    config_lib.check_known_keys(config, reference_config(config))
    if config.mode != "pretrain":
        if config.mode != "transfer":  # a study validates each of its evaluations' configs
            config_lib.validate_eval(config)
        module = __import__(f"medssl_jax.evaluate.{config.mode}", fromlist=["run"])
        return module.run(config, workdir)

    config_lib.validate_pretrain(config)
    store = sources.open_store(config.data)  # opened once: the skip check, pretraining and the probe share it
    skip = after_pretraining.skip_reason(store, config.probe) if config.probe.enabled else None
    if config.probe.enabled and not skip and jax.process_count() > 1:
        # The probe fits scikit-learn on one host's features; a multi-process job probes afterwards.
        skip = f"the linear probe runs on one host, this job has {jax.process_count()} processes"
    if skip:
        logging_lib.log(f"note: the linear probe after pretraining will be skipped: {skip}")
    result = train.pretrain(config, workdir, store=store)
    if result.export_dir is None or not config.probe.enabled:
        return None
    if skip:
        logging_lib.log(f"linear probe skipped: {skip}. The encoder is in {result.export_dir}; probe it on a "
                        "labelled store with: python -m medssl_jax.main --config=configs/linear_probe.py "
                        f"--config.data.store=STORE --config.init={result.export_dir} --workdir=EVAL")
        return None
    summary = after_pretraining.run(
        result.export_dir, config.data, config.probe, mesh=config.mesh, seed=config.seed, workdir=workdir,
        compute_dtype="float32" if jax.devices()[0].platform == "cpu" else config.compute_dtype, store=store,
    )
    logging_lib.log(f"wrote {os.path.join(workdir, 'eval', 'summary.json')}")
    logging_lib.log(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    """The run's last line: the probe's mean AUC and, with the baseline, the paired difference."""
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    line = f"linear probe test mean AUC {fmt(summary['mean_auc'])}"
    vs = summary.get("vs_random_init")
    if vs:
        from medssl_jax.evaluate import bootstrap

        low, high = vs["ci95"]
        line += (f" vs random-init {fmt(summary['random_init']['mean_auc'])}: difference "
                 f"{fmt(vs['mean_auc_diff'], '+.3f')} [95% CI {fmt(low, '+.3f')}, {fmt(high, '+.3f')}], "
                 f"p {_p_text(bootstrap.format_p(vs['p_value'], vs['num_resamples']))} (paired bootstrap, "
                 f"{vs['num_resamples']} resamples of {vs['num_test_images']} test images)")
    return line


def _p_text(formatted: str) -> str:
    return formatted if formatted.startswith("<") else f"= {formatted}"


def main(argv):
    del argv
    import jax
    from absl import logging

    if not os.environ.get("MEDSSL_DEBUG"):
        logging.set_verbosity(logging.WARNING)  # Orbax/Grain INFO lines would drown the progress lines

    if os.environ.get("MEDSSL_DISTRIBUTED"):
        jax.distributed.initialize(**distributed_args(os.environ))
    if not jax.config.jax_compilation_cache_dir:
        # Reruns and resumes skip XLA compilation (minutes for a big model); JAX_COMPILATION_CACHE_DIR
        # overrides the location.
        jax.config.update(
            "jax_compilation_cache_dir",
            os.path.join(os.environ.get("MEDSSL_JAX_CACHE", os.path.expanduser("~/.cache/medssl_jax")), "xla"),
        )
    from medssl_jax import logging_lib

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except Exception as error:  # noqa: BLE001 - turned into one line; MEDSSL_DEBUG=1 shows the traceback
        if os.environ.get("MEDSSL_DEBUG") or not _is_user_error(error):
            raise
        logging_lib.fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


def distributed_args(environ) -> dict:
    """jax.distributed.initialize's process count and id from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set
    (JAX reads JAX_COORDINATOR_ADDRESS itself; without these it detects TPU, SLURM and Open MPI jobs)."""
    args = {}
    for variable, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if environ.get(variable, "") != "":
            try:
                args[name] = int(environ[variable])
            except ValueError:
                raise SystemExit(f"error: {variable}={environ[variable]!r} is not an integer") from None
    return args


def _is_user_error(error: Exception) -> bool:
    from medssl_jax import checkpoint, train
    from medssl_jax.data.store import StoreError

    return isinstance(error, (ValueError, StoreError, checkpoint.CheckpointError, train.TrainingError,
                              FileNotFoundError, json.JSONDecodeError))


def parse_flags(argv):
    """absl flag parsing, with a mistyped `--config.x=...` or a bad config argument (`:runlocal,foo=1`)
    reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as error:
        print(f"error: {flag_error_message(error, argv)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def flag_error_message(error: Exception, argv) -> str:
    """One line for a flag-parsing error, naming the flag that caused it."""
    import re

    # ml_collections puts an escaped repr of its message in the error ("'\\'x\\'\\nDid you mean...").
    text = str(error).encode().decode("unicode_escape")
    if "Traceback (most recent call last)" in text:
        # An exception inside the config file's get_config(): keep its last line ("ValueError: ...").
        last = [line for line in text.splitlines() if re.match(r"^\w*(Error|Exception): ", line.strip())]
        config_flag = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
        detail = last[-1].strip().split(": ", 1)[1] if last else text.splitlines()[-1]
        return f"{config_flag}: {' '.join(detail.replace(chr(39) * 2, chr(39)).split())}"
    detail = " ".join(text.replace("'", "").split())
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    if isinstance(error, AttributeError) and overrides:
        # The unknown name is the first quoted word of the message; blame the override that contains it.
        match = re.search(r"'([^']+)'", text)
        name = match.group(1) if match else ""
        culprit = next((o for o in overrides if name and name in o[len("--config."):].split(".")), overrides[-1])
        return f"unknown config field in {culprit}: {detail}"
    return f"bad command-line flag: {detail}"


def resolve_config_flag(argv: list[str]) -> list[str]:
    """`--config=NAME[:args]` with a NAME that is not a file (the package installed, the user outside a
    checkout) becomes the shipped config of that name: micle, micle.py and configs/micle.py all work."""
    from medssl_jax import config_lib

    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, colon, rest = arg[len("--config="):].partition(":")
            if not os.path.exists(path):
                name = os.path.basename(path)
                candidate = os.path.join(config_lib.shipped_configs_dir(), name if name.endswith(".py") else name + ".py")
                if os.path.exists(candidate):
                    arg = f"--config={candidate}{colon}{rest}"
        out.append(arg)
    return out


def cli() -> None:
    """The `medssl-train` command: `python -m medssl_jax.main` with shipped configs reachable by name."""
    app.run(main, argv=resolve_config_flag(sys.argv), flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
