"""`probe.every`: probe the checkpoint just written, in a separate process.

Training may not import nanollama.probe (it sits above training: tests/test_imports.py), so the hook
runs the probe's command, which loads the unsharded weights from the checkpoint like any later tool.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def probe_command(run_dir: Path, step: int, cfg) -> list[str]:
    """The `python -m nanollama.probe` command line for the checkpoint of `step` (cfg: the ProbeConfig)."""
    cmd = [sys.executable, "-m", "nanollama.probe", str(run_dir), "--checkpoint", str(step)]
    cmd += ["--sequences", str(cfg.sequences), "--quiet"]
    cmd += ["--layers", cfg.layers] if cfg.layers else []
    return cmd + ([] if cfg.controls else ["--no-controls"])


def run_probe(run_dir: Path, step: int, cfg) -> int:
    """Probe; its records go to run_dir/probes.jsonl. Returns the command's exit code (training goes on either way)."""
    return subprocess.run(probe_command(run_dir, step, cfg)).returncode
