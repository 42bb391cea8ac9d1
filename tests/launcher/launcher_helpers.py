"""Helpers for the launcher tests: paths, a tiny training config, a stand-in task package, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tiny_run import tiny

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
DEBUG = ROOT / "configs" / "gssm" / "debug.yaml"
# A tiny CPU training: a couple of seconds of compute per run, most of it process start-up.
TINY = tiny({"checkpoint.every": 1000})

# A stand-in task for tests of the scripts themselves: counts steps in run_dir/step, prints its
# VERSION, logs loss 1/step to run_dir/metrics.jsonl, exits 75 after a step once SIGUSR1 or SIGTERM arrived (like
# nanollama.train), and resumes.
FAKE_TASK = """
import json, os, pathlib, signal, sys, time
import yaml

VERSION = {version!r}
cfg = yaml.safe_load(open(sys.argv[1]))
run_dir = pathlib.Path(cfg["run_dir"])
run_dir.mkdir(parents=True, exist_ok=True)
state = run_dir / "step"
step = int(state.read_text()) if state.exists() else 0
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append("USR1"))
signal.signal(signal.SIGTERM, lambda *a: stop.append("TERM"))
rank = os.environ.get("RANK", "-")  # set by torchrun
print("VERSION", VERSION, "start", step, "value", cfg["value"], "rank", rank, flush=True)
while step < cfg["steps"]:
    time.sleep(cfg["sleep"])
    step += 1
    state.write_text(str(step))
    with open(run_dir / "metrics.jsonl", "a") as f:  # as the trainer logs it: what bash's progress lines read
        f.write(json.dumps(dict(step=step, loss=1.0 / step)) + "\\n")
    if stop:
        print("stopped by", stop[0], "at", step, flush=True)
        sys.exit(75)
print("done", step, flush=True)
"""


def make_fake_package(where: Path, version: str = "v1") -> Path:
    """fakepkg/work.py under `where` (put `where` on sys.path); returns the package directory."""
    pkg = where / "fakepkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "work.py").write_text(textwrap.dedent(FAKE_TASK.format(version=version)))
    return pkg


def launcher_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """`python -m nanollama.launcher ARGS` in a subprocess, importing this checkout."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return subprocess.run(
        [sys.executable, "-m", "nanollama.launcher", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
