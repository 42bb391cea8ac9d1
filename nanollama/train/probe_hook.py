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


def run_probe(run_dir: Path, step: int, cfg, timeout_s: float | None = None) -> str | None:
    """Probe; its records go to run_dir/probes.jsonl. None when it succeeded, else what went wrong.

    Training goes on either way. Under torchrun the other ranks wait in a collective bounded by
    parallel.timeout_s, so the probe is given less than that (`timeout_s`) and killed past it.
    """
    try:
        code = subprocess.run(probe_command(run_dir, step, cfg), timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return f"took longer than {timeout_s:.0f} s and was stopped (lower probe.sequences or raise parallel.timeout_s)"
    return None if code == 0 else f"exited with {code}"
