"""The launcher's output in a checkout: log directories (with their code snapshot) and data are neither linted nor
committed."""

import shutil
import subprocess
import sys

import pytest
from launcher_helpers import ROOT


def _ruff() -> list[str]:
    res = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if res.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed")


def test_ruff_skips_the_log_directories_code_snapshots_and_data(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    files = {
        "logs/sweep/code/nanollama/train.py": False,  # a launch's snapshot: skipped
        "data/corpus/make.py": False,
        "nanollama/data/stream.py": True,  # the package's own data/ is linted
        "tests/data/test_x.py": True,
    }
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("import os\n")
    res = subprocess.run([*_ruff(), "check", "--show-files", "."], cwd=tmp_path, capture_output=True, text=True)
    shown = {name: name in res.stdout for name in files}
    assert shown == files, res.stdout + res.stderr


def test_git_ignores_logs_and_data_but_not_the_packages_data(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["logs/sweep/run.sh", "data/corpus.bin", "nanollama/data/stream.py", "tests/data/test_x.py"]
    res = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.split() == ["logs/sweep/run.sh", "data/corpus.bin"]
