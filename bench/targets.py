"""The kernel issues' GPU targets, read off pytest-benchmark JSON files.

    python bench/targets.py OUT_DIR/bench_*.json [--md OUT_DIR/targets.md]

reads one or more pytest-benchmark JSON files (gpu_check.sh writes one per benchmark file) and
prints one row per target and measurement: what is compared, the measured value, the threshold
and PASS, MISS or "-" (a variant did not run, e.g. flash-attn not installed). The run's own
numbers only: every ratio divides two medians of the same run. The exit status is 0 whatever
the verdicts (a report, not a test); 2 when a file is not a benchmark JSON (it is skipped, the
others are still reported).

Targets (issues 4, 5 and 6; H100/H200):
  rope     forward+backward at S >= 2048: triton >= 4x eager, >= 75% of HBM peak, memory <= 1/2 eager
  attn     prefix-LM and document at S = 8192: flex >= 2x SDPA with a dense mask (fwd and fwd+bwd);
           causal forward: flex >= 0.85x SDPA's causal (flash) path in visible TFLOP/s;
           building one batch's BlockMask < 2% of the attention of a 12-layer step
  Triton rows are given for each Triton variant the run has: "triton" (launched from Python, as a
  model in eager mode runs it) and "triton-graph" (replayed from a CUDA graph: the kernel alone, as
  in compiled or CUDA-graph decoding); memory is compared for "triton" only.
  decode   S_max >= 8K: triton >= 70% of HBM peak; ragged and skewed batches: triton >= 10x eager SDPA;
           time proportional to the sum of lengths: GB/s on a ragged or skewed batch >= 0.7 x GB/s on
           the full batch of the same shape (0.7 is our reading of "proportional")
  scan     (issue 17) the elementwise linear scan at T >= 4K, forward and forward+backward:
           triton >= 70% of HBM peak (the scan is memory-bound)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    issue: int
    target: str
    case: str
    value: float | None  # None: a variant is missing from the run
    threshold: float
    at_least: bool = True  # PASS when value >= threshold (else when value < threshold)

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "-"
        ok = self.value >= self.threshold if self.at_least else self.value < self.threshold
        return "PASS" if ok else "MISS"


def load(path: Path) -> list[dict]:
    try:
        benchmarks = json.loads(path.read_text())["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file ({e})") from None
    return benchmarks


def by_case(benchmarks: list[dict], test: str) -> dict[tuple, dict[str, dict]]:
    """{case params (variant left out): {variant: benchmark}} for one test function."""
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        if b["name"].split("[")[0] != test:
            continue
        params = dict(b.get("params") or {})
        variant = params.pop("variant", "")
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
        cases[key][variant] = b
    return cases


def _median(b: dict | None) -> float | None:
    return b["stats"]["median"] if b else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _info(b: dict | None, key: str) -> float | None:
    return b["extra_info"].get(key) if b else None


def _fast_variants(variants: dict[str, dict]) -> list[str]:
    """The Triton variants of one case ("triton" always listed, so that a missing run shows as "-")."""
    return ["triton"] + [name for name in sorted(variants) if name.startswith("triton-")]


def rope_rows(benchmarks: list[dict]) -> list[Row]:
    rows = []
    for key, v in sorted(by_case(benchmarks, "test_rope_forward_backward").items()):
        B, S, Hq, Hk, D = dict(key)["shape"]
        if S < 2048:
            continue
        case = f"B{B} S{S} Hq{Hq} Hk{Hk} D{D}"
        eager = v.get("eager")
        for name in _fast_variants(v):
            fast, label = v.get(name), f"{case} [{name}]"
            rows.append(Row(4, "rope fwd+bwd speed-up over eager", label, _ratio(_median(eager), _median(fast)), 4.0))
            rows.append(Row(4, "rope fwd+bwd fraction of HBM peak", label, _info(fast, "frac_peak_bw"), 0.75))
        triton_mem = _info(v.get("triton"), "call_mem_bytes")
        memory = _ratio(triton_mem, _info(eager, "call_mem_bytes"))
        rows.append(Row(4, "rope fwd+bwd memory / eager's", f"{case} [triton]", memory, 0.5, at_least=False))
    return rows


def attention_rows(benchmarks: list[dict]) -> list[Row]:
    rows = []
    for key, v in sorted(by_case(benchmarks, "test_attention").items()):
        p = dict(key)
        case = f"{p['mask_name']} {p['passes']} S{p['S']}"
        flex = v.get("flex")
        if p["mask_name"] in ("prefix_lm", "document") and p["S"] == 8192:
            speedup = _ratio(_median(v.get("sdpa-dense")), _median(flex))
            rows.append(Row(5, "flex speed-up over SDPA dense mask", case, speedup, 2.0))
        if p["mask_name"] == "causal" and p["passes"] == "fwd":
            ratio = _ratio(_info(flex, "tflop_per_s"), _info(v.get("sdpa-causal"), "tflop_per_s"))
            rows.append(Row(5, "flex causal / SDPA causal TFLOP/s", case, ratio, 0.85))
    for key, v in sorted(by_case(benchmarks, "test_block_mask_build").items()):
        p = dict(key)
        frac = _info(v.get(""), "frac_of_step_L12")
        rows.append(Row(5, "block-mask build / 12-layer step", f"{p['mask_name']} S{p['S']}", frac, 0.02, False))
    return rows


def decode_rows(benchmarks: list[dict]) -> list[Row]:
    rows = []
    cases = by_case(benchmarks, "test_decode_attention")
    full_gbs = {}  # (B, S_max, variant) -> GB/s on the full batch
    for key, v in cases.items():
        B, S_max, pattern = dict(key)["case"]
        if pattern == "full":
            for name in _fast_variants(v):
                full_gbs[B, S_max, name] = _info(v.get(name), "gb_per_s")
    for key, v in sorted(cases.items()):
        B, S_max, pattern = dict(key)["case"]
        for name in _fast_variants(v):
            fast, case = v.get(name), f"B{B} S{S_max} {pattern} [{name}]"
            if S_max >= 8192:
                rows.append(Row(6, "decode fraction of HBM peak", case, _info(fast, "frac_peak_bw"), 0.70))
            if pattern != "full":
                speedup = _ratio(_median(v.get("eager")), _median(fast))
                rows.append(Row(6, "decode speed-up over eager SDPA", case, speedup, 10.0))
                if (B, S_max, name) in full_gbs:
                    ratio = _ratio(_info(fast, "gb_per_s"), full_gbs[B, S_max, name])
                    rows.append(Row(6, "decode GB/s vs the full batch", case, ratio, 0.7))
    return rows


def scan_rows(benchmarks: list[dict]) -> list[Row]:
    rows = []
    for test, passes in (("test_scan_forward", "fwd"), ("test_scan_forward_backward", "fwd+bwd")):
        for key, v in sorted(by_case(benchmarks, test).items()):
            B, T, C = dict(key)["shape"]
            if T < 4096:
                continue
            for name in _fast_variants(v):
                case = f"B{B} T{T} C{C} [{name}]"
                rows.append(
                    Row(17, f"scan {passes} fraction of HBM peak", case, _info(v.get(name), "frac_peak_bw"), 0.70)
                )
    return rows


def all_rows(benchmarks: list[dict]) -> list[Row]:
    return rope_rows(benchmarks) + attention_rows(benchmarks) + decode_rows(benchmarks) + scan_rows(benchmarks)


def format_rows(rows: list[Row], markdown: bool = False) -> str:
    head = ("issue", "target", "case", "value", "needs", "verdict")
    lines = []
    for r in rows:
        value = "-" if r.value is None else f"{r.value:.3f}"
        needs = f"{'>=' if r.at_least else '<'} {r.threshold:g}"
        lines.append((str(r.issue), r.target, r.case, value, needs, r.verdict))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(x[i].ljust(widths[i]) for i in range(len(head))) for x in [head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path, nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--md", type=Path, help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    benchmarks, unreadable = [], 0
    for path in args.bench_json:  # one bad file (a stage killed mid-write) must not hide the others
        try:
            benchmarks += load(path)
        except ValueError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            unreadable += 1
    rows = all_rows(benchmarks)
    devices = sorted({str(b["extra_info"].get("device")) for b in benchmarks if "device" in b["extra_info"]})
    print(f"device: {', '.join(devices) or 'unknown'} (the targets are for an H100/H200)")
    print(format_rows(rows))
    counts = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "MISS", "-")}
    print(f"{counts['PASS']} pass, {counts['MISS']} miss, {counts['-']} not measured")
    if args.md:
        args.md.write_text(format_rows(rows, markdown=True) + "\n")
    return 2 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
