"""Test-session setup: 8 fake CPU devices and parsed absl flags.

XLA reads the device count once, when jax first initialises its backend, so it must be set before any
test module imports jax. Grain's multiprocessing path reads absl flags, which pytest never parses.
"""
import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import pytest  # noqa: E402

from absl import flags  # noqa: E402

# One persistent compilation cache for the session: the train tests build the same step several times
# (fresh, interrupted, resumed), and XLA compilation dominates their run time on 2 CPU cores.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="medssl_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tests run tiny models for a few steps: XLA's optimisation passes cost far more time than they save.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def pytest_configure(config):
    del config
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # transformers and timm import torchvision when it is installed; the index's CUDA build of it needs the
    # import that tests/torchvision_ops.py explains, before any test module imports either.
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        import torchvision_ops

        torchvision_ops.import_torchvision()


def _xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_collection_modifyitems(items):
    """The modules that wait for background runs go last in one process, so their runs have the whole suite
    to finish in. Under pytest-xdist (`-n 2`) they go first: there a group starts when its module's first
    test waits for it (tests/background_runs.py), and the other worker keeps the second core busy."""
    import background_runs

    waiting = background_runs.modules()
    items.sort(key=lambda item: (item.path.name in waiting) != _xdist_worker())  # stable within each part


def pytest_collection_finish(session):
    """Starts the background runs of the selected test modules (see tests/background_runs.py). Not under
    pytest-xdist: every worker collects every test, so each would start every group."""
    import background_runs

    if not _xdist_worker():
        background_runs.start({item.path.name for item in session.items})


def pytest_terminal_summary(terminalreporter):
    import background_runs

    if background_runs.timeline():
        terminalreporter.write_line(f"background groups: {background_runs.timeline()}")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's in-memory compiled programs after each module: a worker that runs many modules would
    otherwise keep every executable it ever built (gigabytes by the end); the persistent compilation
    cache still serves a program another module compiles again."""
    yield
    import jax

    jax.clear_caches()


def pytest_sessionfinish(session):
    del session
    import sys

    import background_runs

    background_runs.stop()
    if "learning_runs" in sys.modules:
        sys.modules["learning_runs"].cleanup()
