"""What a run directory holds for a tracker: step-keyed records per source, and profiler traces.

source        file                          keys in the tracker
metrics       RUN_DIR/metrics.jsonl         as logged live (loss, lr, eval_loss, profile summaries, ...)
evaluations   RUN_DIR/evaluations.jsonl     evaluate/<key>   (python -m nanollama.evaluate)
probes        RUN_DIR/probes.jsonl          probe/<node>/<layer>/<key>   (python -m nanollama.probe)
profile       RUN_DIR/profile.jsonl         profile/<key>   (any record with an integer `step`)
traces        RUN_DIR/profile/**/*.json.gz  artifacts (wandb)

Absent files are empty sources; lines cut short and records without an integer step are skipped.
"""

from __future__ import annotations

from pathlib import Path

from nanollama.observe.metrics import read_records
from nanollama.observe.trackers import scalars
from nanollama.utils.checks import is_int

SOURCES = ("metrics", "evaluations", "probes", "profile")
_FILES = {"metrics": "metrics.jsonl", "evaluations": "evaluations.jsonl", "probes": "probes.jsonl"}
# a probe record's identity and sampling settings: in its key, or the same for every record
_PROBE_META = ("step", "layer", "node", "sequences", "seq_len", "seed")


def _values(source: str, record: dict) -> dict[str, float]:
    if source == "metrics":
        return scalars(record)
    if source == "probes":
        rest = {k: v for k, v in record.items() if k not in _PROBE_META}
        return scalars(rest, f"probe/{record.get('node', '-')}/{record.get('layer', '-')}/")
    prefix = "evaluate/" if source == "evaluations" else f"{source}/"
    return scalars({k: v for k, v in record.items() if k != "step"}, prefix)


def read(run_dir: str | Path) -> dict[str, dict[int, dict[str, float]]]:
    """source -> step -> the numbers logged at that step (records of one step merged), steps ascending."""
    run_dir = Path(run_dir)
    out = {}
    for source in SOURCES:
        rows: dict[int, dict[str, float]] = {}
        for record in read_records(run_dir / _FILES.get(source, f"{source}.jsonl")):
            step = record.get("step")
            if is_int(step) and step >= 0:
                rows.setdefault(int(step), {}).update(_values(source, record))
        out[source] = dict(sorted(rows.items()))
    return out


def traces(run_dir: str | Path) -> list[Path]:
    """The profiler's Chrome traces (RUN_DIR/profile/step_*/rank*.json.gz), oldest step first."""
    return sorted((Path(run_dir) / "profile").glob("**/*.json.gz"))
