"""Progress lines, metrics.jsonl and TensorBoard event files (via tensorboardX, no TensorFlow).

Only process 0 writes. Rates skip the first measured interval because it contains compilation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import NoReturn

import jax


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class MetricWriter:
    """Appends scalars to WORKDIR/metrics.jsonl and WORKDIR/tensorboard/ event files."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, resume_step: int | None = None):
        """`resume_step`: the step the run restarts from; rows after it (logged after the checkpoint it
        resumes from, by the run that was interrupted) are dropped, so every step appears once."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if resume_step is not None and os.path.exists(path):
                _truncate_after(path, resume_step)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Rewrites metrics.jsonl without the rows of steps > `step` (and without a torn last line)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if int(row.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class Progress:
    """Rate (items/s) and ETA for a loop of `total` steps of `items_per_step` items each."""

    def __init__(self, total: int, *, items_per_step: int, start_step: int = 0, unit: str = "views"):
        self.total = total
        self.items_per_step = items_per_step
        self.unit = unit
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._rate = float("nan")
        self._intervals = 0

    def update(self, step: int) -> float:
        """Call after `step` has finished (after a host sync). Returns items/s over the last interval."""
        now = time.perf_counter()
        steps = step - self._last_step
        if steps > 0:
            rate = steps * self.items_per_step / max(now - self._last_time, 1e-9)
            self._intervals += 1
            # The first interval includes compilation; report it but don't let it drive the ETA.
            self._rate = rate
        self._last_step, self._last_time = step, now
        return self._rate

    @property
    def rate(self) -> float:
        return self._rate

    def eta(self, step: int) -> float:
        if not self._rate or not math.isfinite(self._rate):
            return float("nan")
        return (self.total - step) * self.items_per_step / self._rate

    def line(self, step: int, **values: float) -> str:
        parts = [f"step {step}/{self.total}"]
        for name, value in values.items():
            parts.append(f"{name} {value:.4g}")
        parts.append(f"{self._rate:,.0f} {self.unit}/s" if math.isfinite(self._rate) else f"? {self.unit}/s")
        parts.append(f"ETA {format_duration(self.eta(step))}")
        return " | ".join(parts)


class FileProgress:
    """One self-overwriting line on stderr for file-by-file work (ingestion, store verification): files
    done, files/s, ETA, skipped. Never a path (paths of a PACS export can name patients)."""

    def __init__(self, total: int, enabled: bool = True, every_s: float = 0.5):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, skipped: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        sys.stderr.write(f"\r[ingest] {done}/{self.total} files  {rate:.1f} files/s  "
                         f"ETA {format_duration(eta)}  skipped {skipped}   ")
        if force:
            sys.stderr.write("\n")
        sys.stderr.flush()


def log(message: str) -> None:
    """One line to stdout on process 0, flushed (progress must show up in CI logs and pipes)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def fail(message: str) -> NoReturn:
    """Stops the program with one clear line on stderr and exit code 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)
