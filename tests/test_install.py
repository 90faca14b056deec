"""``pip install .`` (not editable) puts the commands on PATH, and each runs ``--help``.

Installed with ``--no-deps --no-build-isolation --target`` into a temporary folder: nothing is
downloaded or reinstalled (torch and the rest come from the running environment), and the
console scripts run the installed copy, not this checkout. Skipped where pip cannot build offline.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from apt_train.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("install")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--no-compile", "--quiet", "--target", str(target), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"pip cannot build the package offline here: {proc.stderr.strip()[-500:]}")
    return target


def test_the_console_scripts_are_the_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"apt_train.commands.{module}:main" for name, module in COMMANDS.items()}
    for module in COMMANDS.values():  # and each has its three-line script in tools/
        assert f"from apt_train.commands.{module} import main" in (ROOT / "tools" / f"{module}.py").read_text()


def test_pip_install_puts_every_command_on_path_and_each_runs_help(installed, tmp_path):
    packages = sorted(p.name for p in installed.iterdir() if p.is_dir() and not p.name.endswith(".dist-info"))
    assert [p for p in packages if p != "bin"] == ["apt_data", "apt_model", "apt_train"]  # no tools/, tests/
    env = {**os.environ, "PYTHONPATH": str(installed), "PATH": f"{installed / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    for name in COMMANDS:
        assert (installed / "bin" / name).is_file(), name
        proc = subprocess.run([name, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(f"usage: {name} "), proc.stdout[:200]
    # far from a checkout, the default data (./shards) is missing: one line naming it, status 2
    proc = subprocess.run(["apt-train", "--steps", "1", "--workers", "0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [l for l in proc.stderr.splitlines() if "error" in l] == \
        ["apt-train: error: --data shards: shards does not exist"], proc.stderr[-2000:]
    where = subprocess.run([sys.executable, "-c", "import apt_train; print(apt_train.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60).stdout
    assert where.startswith(str(installed)), where
