"""`pip install .` gives the package, the shipped configs reachable by name, and the four commands."""

import configparser
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_package_configs_and_commands(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(os.path.join(REPO, name), source / name)
    for name in ("medssl_jax", "configs"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    # No network: the build backend is the setuptools this venv already has; dependencies are not installed.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = os.listdir(tmp_path / "dist")
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(tmp_path / "dist" / wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert (target / "medssl_jax" / "configs" / "micle.py").exists()
    (info,) = [d for d in os.listdir(target) if d.endswith(".dist-info")]
    entry_points = configparser.ConfigParser()
    entry_points.read(target / info / "entry_points.txt")
    assert dict(entry_points["console_scripts"]) == {
        "medssl-train": "medssl_jax.main:cli", "medssl-ingest": "medssl_jax.ingest:main",
        "medssl-convert": "medssl_jax.convert:main", "medssl-compare": "medssl_jax.compare:main"}
    requires = (target / info / "METADATA").read_text()
    assert "Requires-Dist: jax" in requires and "Requires-Dist: grain" in requires
    # Outside any checkout, with only the installed copy importable: the commands' functions run, and a
    # config given by name resolves to the shipped file.
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = ("import sys; from medssl_jax import main; "
              "print(main.resolve_config_flag(['x', '--config=micle:runlocal'])[1]); "
              "sys.argv = ['medssl-ingest', '--help']; from medssl_jax.ingest import main as ingest; ingest()")
    out = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.splitlines()[0] == f"--config={target / 'medssl_jax' / 'configs' / 'micle.py'}:runlocal"
    assert "usage: python -m medssl_jax.ingest" in out.stdout
