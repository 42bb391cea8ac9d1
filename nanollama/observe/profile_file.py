"""RUN_DIR/profile.jsonl: the light profiler's JSON lines (torch-free: reports and trackers read it too).

Files. Each rank writes its own: rank 0 `profile.jsonl`, rank r > 0 `profile.rank{r}.jsonl` (data wait,
memory and phase times differ between ranks). When a resumed run's schema differs from the file's, a new
file is started beside it, `profile.1.jsonl`, `profile.2.jsonl`, ... (`profile.rank{r}.{n}.jsonl`): one
schema per file, the highest number is the newest. `profile_files(run_dir, rank)` lists them in order.

Line 1, the schema (written once per file, compared whole on resume):
    {"schema": "nanollama.profile", "version": 1, "fields": [...FIELDS], "units": {...}}
Then one record per profiled step (every profile.light_every-th global step; log.every by default):
    step            global optimizer step (1-based; the one just finished)
    time            unix time at the end of the step
    step_s          wall time of the whole step: data_s + fwd_bwd_s + optim_s + monitor_s
    data_s          waiting for the next micro-batches (all micro-steps of the step)
    fwd_bwd_s       forward and backward, including the loss read-back (.item())
    optim_s         loss all-reduce, grad clipping, optimizer step and zero_grad
    monitor_s       logging, evaluation, checkpoint save and probes after the step (0 on most steps)
    tokens          tokens in the step, all ranks
    tokens_per_s    tokens / (data_s + fwd_bwd_s + optim_s): training throughput, monitor excluded
    tflops          achieved model TFLOP/s per device (flops_per_token * tokens / world / train time)
    mfu, hfu        model / hardware FLOPs utilisation against the device's peak; null where the peak is unknown
    mem_peak_bytes  CUDA: torch.cuda.max_memory_allocated (process peak); CPU: peak RSS (VmHWM)
    mem_reserved_bytes  CUDA: torch.cuda.memory_reserved now; CPU: current RSS
    mem_kind        "cuda" or "rss": what the two memory fields measure
    traced          the step ran under torch.profiler (its times include the profiler's cost)
On a GPU the profiled steps synchronise the device at each phase boundary, so the split is exact there;
other steps are not timed and not synchronised.

Writes append whole lines (one write, flushed); a line cut short by a crash is skipped on read and dropped
when the file is next opened. A resumed run first drops records past the step it resumed from (as
metrics.jsonl does), so no step appears twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nanollama.observe.metrics import read_records
from nanollama.utils.fileio import write_atomic

SCHEMA = "nanollama.profile"
VERSION = 1
FIELDS = [
    "step",
    "time",
    "step_s",
    "data_s",
    "fwd_bwd_s",
    "optim_s",
    "monitor_s",
    "tokens",
    "tokens_per_s",
    "tflops",
    "mfu",
    "hfu",
    "mem_peak_bytes",
    "mem_reserved_bytes",
    "mem_kind",
    "traced",
]
UNITS = {"*_s": "seconds", "tokens_per_s": "tokens/second", "tflops": "1e12 FLOP/s per device", "mem_*": "bytes"}


def schema_line() -> dict:
    return {"schema": SCHEMA, "version": VERSION, "fields": FIELDS, "units": UNITS}


def _base(rank: int) -> str:
    return "profile" if rank == 0 else f"profile.rank{rank}"


def _numbered(run_dir: Path, rank: int) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"^{re.escape(_base(rank))}(?:\.(\d+))?\.jsonl$")
    found = []
    for path in Path(run_dir).glob(f"{_base(rank)}*.jsonl"):
        m = pattern.match(path.name)
        if m:
            found.append((int(m.group(1) or 0), path))
    return sorted(found)


def profile_files(run_dir: str | Path, rank: int = 0) -> list[Path]:
    """A rank's profile files, oldest first (profile.jsonl, profile.1.jsonl, ...)."""
    return [path for _, path in _numbered(Path(run_dir), rank)]


def read_profile(path: str | Path) -> tuple[dict | None, list[dict]]:
    """(schema line or None, step records) of one profile file; torn lines skipped."""
    records = read_records(path)
    header = records[0] if records and "schema" in records[0] else None
    return header, [r for r in records if "step" in r and "schema" not in r]


class ProfileFile:
    """One rank's current profile file: opened for a run that starts (or resumes) at `step`."""

    def __init__(self, run_dir: str | Path, rank: int = 0):
        self.run_dir, self.rank = Path(run_dir), rank
        self.path: Path | None = None

    def open(self, step: int) -> str | None:
        """Drop records past `step` in every file of this rank, then append to the newest file if its schema
        is this version's, else start the next file. Returns a note when a new file was started for a
        schema change (for the log), else None."""
        numbered = _numbered(self.run_dir, self.rank)
        files = [path for _, path in numbered]
        for path in files:
            _truncate_after(path, step)
        expected = schema_line()
        if files and read_profile(files[-1])[0] == expected:
            self.path = files[-1]
            return None
        n = numbered[-1][0] + 1 if numbered else 0
        self.path = self.run_dir / (f"{_base(self.rank)}.jsonl" if n == 0 else f"{_base(self.rank)}.{n}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(expected) + "\n")
        if files:
            return f"{files[-1].name} has another schema (an older version?): profiling into {self.path.name}"
        return None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:  # one write of a whole line, flushed on close
            f.write(json.dumps(record) + "\n")


def _truncate_after(path: Path, step: int) -> None:
    """As MetricsFile.truncate_after, keeping the schema line; rewrites only when something is dropped."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = [line for line in lines if _keep(line, step)]
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        write_atomic(path, "".join(line + "\n" for line in kept))


def _keep(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False  # torn by a crash
    if not isinstance(record, dict):
        return False
    return "schema" in record or (isinstance(record.get("step"), int) and record["step"] <= step)
