"""Long subprocess runs of some test modules, started in the background as soon as pytest has collected
their tests (conftest.py, `pytest_collection_finish`), so that they use the CPU the compile-bound rest of
the suite leaves idle (it mostly keeps one of 2 cores busy) instead of running after it.

A test module registers named groups of processes (`register`); the groups start one after another in
registration order on a background thread, each when the previous one has finished (so they do not
compete with each other); a test waits for its group with `wait(name)`. Groups of modules whose tests
are not selected never start. Modules with groups run after every other module (conftest.py), so their
runs have the whole suite to finish in; the summary line "background groups: ..." says when each ran.
"""

import subprocess
import threading
import time

_groups: dict = {}  # name -> {"module": file name, "start": () -> [Popen], "done": Event, "processes": [...]}
_thread: list = []
_claimed: set = set()  # names of the groups a thread has taken on
_t0: list = []
TIMEOUT_S = 900


def register(name: str, module: str, start) -> None:
    """`start()` launches the group's processes and returns their Popen objects."""
    _groups.setdefault(name, {"module": module, "start": start, "done": threading.Event(), "processes": None,
                              "error": None})


def modules() -> set:
    """The file names of the modules that registered groups."""
    return {g["module"] for g in _groups.values()}


def _run(names) -> None:
    for name in names:
        group = _groups[name]
        group["began"] = time.monotonic()
        try:
            group["processes"] = group["start"]()
            for process in group["processes"]:
                process.wait(timeout=TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - reported to the test that waits for it
            group["error"] = error
        finally:
            group["ended"] = time.monotonic()
            group["done"].set()


def start(selected_modules) -> None:
    """Starts the not yet started groups of the modules among `selected_modules` (file names), one after
    another on one background thread."""
    names = [n for n, g in _groups.items() if g["module"] in set(selected_modules) and n not in _claimed]
    if not names:
        return
    if not _t0:
        _t0.append(time.monotonic())
    _claimed.update(names)
    thread = threading.Thread(target=_run, args=(names,), daemon=True)
    _thread.append(thread)
    thread.start()


def wait(name: str) -> list:
    """The finished processes of group `name`; started here (and waited for) if nothing started it."""
    group = _groups[name]
    if name not in _claimed:
        start([group["module"]])
    if not group["done"].wait(timeout=TIMEOUT_S * 2):
        raise AssertionError(f"background group {name} did not finish")
    if group["error"] is not None:
        raise group["error"]
    return group["processes"]


def timeline() -> str:
    """When each group ran, in seconds after the background start (for whoever balances the suite)."""
    spans = [f"{name} {g['began'] - _t0[0]:.0f}-{g['ended'] - _t0[0]:.0f} s" for name, g in _groups.items()
             if "ended" in g and _t0]
    return ", ".join(spans)


def stop() -> None:
    """Kills whatever still runs (end of the session)."""
    for group in _groups.values():
        for process in group["processes"] or []:
            if isinstance(process, subprocess.Popen) and process.poll() is None:
                process.kill()
                process.wait()
