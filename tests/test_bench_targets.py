"""bench/targets.py turns one benchmark JSON into the issues' target verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import targets  # noqa: E402


def bench(test: str, median: float, **params) -> dict:
    extra = params.pop("extra", {})
    return {"name": f"{test}[x]", "params": params, "stats": {"median": median}, "extra_info": extra}


def verdicts(rows) -> dict[tuple[str, str], str]:
    return {(r.target, r.case): (r.verdict, None if r.value is None else round(r.value, 3)) for r in rows}


def test_rope_targets_compare_triton_with_eager_of_the_same_shape():
    shape, small = [8, 2048, 32, 8, 128], [2, 256, 8, 2, 64]
    rows = targets.rope_rows(
        [
            bench("test_rope_forward_backward", 1.0, shape=shape, variant="eager", extra={"call_mem_bytes": 100}),
            bench(
                "test_rope_forward_backward",
                0.2,
                shape=shape,
                variant="triton",
                extra={"call_mem_bytes": 60, "frac_peak_bw": 0.8},
            ),
            bench("test_rope_forward_backward", 0.1, shape=shape, variant="triton-graph", extra={"frac_peak_bw": 0.7}),
            bench("test_rope_forward_backward", 1.0, shape=small, variant="eager"),  # below 2K: no target
            bench("test_rope_forward", 0.1, shape=shape, variant="triton"),  # forward only: no target
        ]
    )
    case = "B8 S2048 Hq32 Hk8 D128"
    assert verdicts(rows) == {
        ("rope fwd+bwd speed-up over eager", f"{case} [triton]"): ("PASS", 5.0),
        ("rope fwd+bwd fraction of HBM peak", f"{case} [triton]"): ("PASS", 0.8),
        ("rope fwd+bwd speed-up over eager", f"{case} [triton-graph]"): ("PASS", 10.0),
        ("rope fwd+bwd fraction of HBM peak", f"{case} [triton-graph]"): ("MISS", 0.7),
        ("rope fwd+bwd memory / eager's", f"{case} [triton]"): ("MISS", 0.6),  # not for graph replays
    }


def test_attention_targets():
    def causal(variant, tflops):
        return bench(
            "test_attention",
            1.0,
            passes="fwd",
            mask_name="causal",
            S=1024,
            variant=variant,
            extra={"tflop_per_s": tflops},
        )

    rows = targets.attention_rows(
        [
            bench("test_attention", 3.0, passes="fwd", mask_name="document", S=8192, variant="sdpa-dense"),
            bench("test_attention", 2.0, passes="fwd", mask_name="document", S=8192, variant="flex"),
            bench("test_attention", 1.0, passes="fwd", mask_name="document", S=1024, variant="flex"),  # not 8K
            causal("flex", 90),
            causal("sdpa-causal", 100),
            bench("test_block_mask_build", 1.0, mask_name="causal", S=1024, extra={"frac_of_step_L12": 0.001}),
        ]
    )
    assert verdicts(rows) == {
        ("flex speed-up over SDPA dense mask", "document fwd S8192"): ("MISS", 1.5),
        ("flex causal / SDPA causal TFLOP/s", "causal fwd S1024"): ("PASS", 0.9),
        ("block-mask build / 12-layer step", "causal S1024"): ("PASS", 0.001),
    }


def test_decode_targets_and_a_missing_variant():
    def dec(median, case, variant, **extra):
        return bench("test_decode_attention", median, case=case, variant=variant, extra=extra)

    rows = targets.decode_rows(
        [
            dec(1.0, [8, 8192, "full"], "triton", frac_peak_bw=0.72, gb_per_s=100.0),
            dec(0.1, [8, 8192, "ragged"], "triton", frac_peak_bw=0.5, gb_per_s=60.0),
            dec(2.0, [8, 8192, "ragged"], "eager"),
            dec(1.0, [4, 1024, "skew"], "eager"),  # triton missing (CPU run): not measured
        ]
    )
    assert verdicts(rows) == {
        ("decode fraction of HBM peak", "B8 S8192 full [triton]"): ("PASS", 0.72),
        ("decode fraction of HBM peak", "B8 S8192 ragged [triton]"): ("MISS", 0.5),
        ("decode speed-up over eager SDPA", "B8 S8192 ragged [triton]"): ("PASS", 20.0),
        ("decode GB/s vs the full batch", "B8 S8192 ragged [triton]"): ("MISS", 0.6),
        ("decode speed-up over eager SDPA", "B4 S1024 skew [triton]"): ("-", None),
    }


def test_cli_reads_several_files_writes_markdown_and_rejects_other_files(tmp_path, capsys):
    build = bench(
        "test_block_mask_build", 1.0, mask_name="causal", S=64, extra={"frac_of_step_L12": 0.5, "device": "cpu"}
    )
    path, other = tmp_path / "bench_attention.json", tmp_path / "bench_rope.json"
    path.write_text(json.dumps({"benchmarks": [build]}))
    other.write_text(json.dumps({"benchmarks": []}))
    assert targets.main([str(path), str(other), "--md", str(tmp_path / "t.md")]) == 0
    assert "0 pass, 1 miss, 0 not measured" in capsys.readouterr().out
    row = "| 5 | block-mask build / 12-layer step | causal S64 | 0.500 | < 0.02 | MISS |"
    assert row in (tmp_path / "t.md").read_text()
    path.write_text("[]")
    other.write_text(json.dumps({"benchmarks": [build]}))
    assert targets.main([str(path), str(other)]) == 2  # the bad file is skipped, the other still reported
    out = capsys.readouterr()
    assert "bench_attention.json: not a pytest-benchmark JSON file" in out.err and "0 pass, 1 miss" in out.out


def test_scan_targets():
    long, short = [8, 4096, 1536], [4, 512, 128]
    rows = targets.scan_rows(
        [
            bench("test_scan_forward", 1.0, shape=long, variant="triton", extra={"frac_peak_bw": 0.75}),
            bench("test_scan_forward_backward", 1.0, shape=long, variant="triton-graph", extra={"frac_peak_bw": 0.6}),
            bench("test_scan_forward", 1.0, shape=short, variant="triton", extra={"frac_peak_bw": 0.1}),  # T < 4K
        ]
    )
    case = "B8 T4096 C1536"
    assert verdicts(rows) == {
        ("scan fwd fraction of HBM peak", f"{case} [triton]"): ("PASS", 0.75),
        ("scan fwd+bwd fraction of HBM peak", f"{case} [triton]"): ("-", None),  # not measured
        ("scan fwd+bwd fraction of HBM peak", f"{case} [triton-graph]"): ("MISS", 0.6),
    }
