"""The `profile` section: the light profiler's profile.jsonl, torch.profiler traces and their summaries,
and the analytical MFU/HFU FLOPs checked against torch.profiler's FLOP count."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import CONFIG, tiny

from nanollama.config import ConfigError, build
from nanollama.models.transformer import Transformer, TransformerConfig
from nanollama.observe import flops
from nanollama.observe.metrics import MetricsFile
from nanollama.observe.profile_config import ProfileConfig
from nanollama.observe.profile_file import FIELDS, ProfileFile, profile_files, read_profile, schema_line
from nanollama.observe.trace import Tracer, summarize
from nanollama.train import checkpoint
from nanollama.train.cli import main, parse

TOKENS = 8 * 16  # TINY's batch_size x seq_len


def train(run_dir: Path, *extra: str) -> int:
    return main([str(CONFIG), *tiny(), f"run_dir={run_dir}", "device=cpu", *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def traces(metrics: Path) -> list[dict]:
    return [r for r in MetricsFile(metrics).read() if r.get("kind") == "trace"]


def test_light_profile_records_every_step_under_one_schema_line(tmp_path):
    assert train(tmp_path / "run", "steps=4", "profile.light=true") == 0
    header, *records = lines(tmp_path / "run" / "profile.jsonl")
    assert header == schema_line() and header["fields"] == FIELDS
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # log.every=1: every step is profiled
    for r in records:
        assert list(r) == FIELDS
        phases = r["data_s"] + r["fwd_bwd_s"] + r["optim_s"] + r["monitor_s"]
        assert r["step_s"] == pytest.approx(phases, rel=1e-6, abs=1e-9)
        assert min(r["data_s"], r["fwd_bwd_s"], r["optim_s"]) > 0
        assert r["tokens"] == TOKENS
        assert r["tokens_per_s"] == pytest.approx(TOKENS / (r["data_s"] + r["fwd_bwd_s"] + r["optim_s"]))
        assert r["tflops"] > 0 and r["mfu"] is None and r["hfu"] is None  # no peak FLOP/s for a CPU
        assert r["mem_kind"] == "rss" and r["mem_peak_bytes"] >= r["mem_reserved_bytes"] > 0
        assert r["traced"] is False
    assert records[-1]["monitor_s"] > records[0]["monitor_s"]  # the last step evaluates and checkpoints
    log = (tmp_path / "run" / "train.log").read_text()
    assert "profile: light every 1 steps -> profile.jsonl (memory: the process's RSS peak (CPU))" in log


def test_profile_off_writes_nothing(tmp_path):
    assert train(tmp_path / "run", "steps=2") == 0
    assert not (tmp_path / "run" / "profile.jsonl").exists() and not (tmp_path / "run" / "profile").exists()
    assert "profile:" not in (tmp_path / "run" / "train.log").read_text()


def test_light_every_and_resume_append_without_duplicate_steps(tmp_path):
    run = tmp_path / "run"
    args = ("checkpoint.every=3", "checkpoint.keep=5", "profile.light=true", "profile.light_every=2")
    assert train(run, "steps=6", *args) == 0
    assert [r["step"] for r in read_profile(run / "profile.jsonl")[1]] == [2, 4, 6]
    # The run died after step 6 but its last checkpoint is step 3: steps 4..6 are replayed, then on to 8.
    shutil.rmtree(checkpoint.step_dir(run / "checkpoints", 6))
    assert train(run, "steps=8", *args) == 0
    records = lines(run / "profile.jsonl")
    assert sum("schema" in r for r in records) == 1 and "schema" in records[0]
    assert [r["step"] for r in records[1:]] == [2, 4, 6, 8]
    assert profile_files(run) == [run / "profile.jsonl"]


def test_schema_mismatch_starts_a_new_file(tmp_path):
    run = tmp_path / "run"
    assert train(run, "steps=3", "profile.light=true") == 0
    old = lines(run / "profile.jsonl")
    old[0]["version"] = 0  # as an older nanollama would have written it
    (run / "profile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert train(run, "steps=5", "profile.light=true") == 0
    assert lines(run / "profile.jsonl") == old  # left as it was: steps 1..3 under the old schema
    header, records = read_profile(run / "profile.1.jsonl")
    assert header == schema_line() and [r["step"] for r in records] == [4, 5]
    assert profile_files(run) == [run / "profile.jsonl", run / "profile.1.jsonl"]
    assert "profile.jsonl has another schema" in (run / "train.log").read_text()


def test_torn_last_line_is_skipped_and_dropped_before_appending(tmp_path):
    f = ProfileFile(tmp_path)
    f.open(0)
    f.write({"step": 1, "x": 1.0})
    f.write({"step": 2, "x": 2.0})
    with open(f.path, "a") as out:
        out.write('{"step": 3, "x": 3.')  # a crash mid-write
    assert read_profile(f.path) == (schema_line(), [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}])
    again = ProfileFile(tmp_path)
    assert again.open(2) is None and again.path == f.path  # same schema: the same file
    again.write({"step": 3, "x": 3.0})
    assert [r["step"] for r in lines(f.path)[1:]] == [1, 2, 3]
    rank1 = ProfileFile(tmp_path, rank=1)
    rank1.open(0)
    assert rank1.path.name == "profile.rank1.jsonl" and profile_files(tmp_path) == [f.path]


def test_traces_are_named_by_global_step_and_survive_a_resume(tmp_path):
    run = tmp_path / "run"
    # One window [3, 3] per 4 steps (3, 7, ...): a trace of step 3 alone (no warm-up).
    args = ("checkpoint.every=2", "checkpoint.keep=5", "profile.trace=[3,3]", "profile.every=4", "profile.warmup=0")
    assert train(run, "steps=4", *args) == 0
    first = run / "profile" / "step_00000003" / "rank0.json.gz"
    original = first.read_bytes()
    trace = json.loads(gzip.decompress(original))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])  # a real chrome trace
    [summary] = traces(run / "metrics.jsonl")
    assert summary["step"] == 3 and summary["trace_steps"] == [3, 3]
    assert summary["trace_file"] == "profile/step_00000003/rank0.json.gz"
    assert summary["trace_time"] == "cpu" and summary["trace_comm_share"] == 0.0  # one process: no collectives
    assert 0.0 <= summary["trace_idle_share"] < 1.0 and summary["trace_span_s"] > 0
    assert len(summary["trace_top"]) == 5 and sum(share for _, _, share in summary["trace_top"]) <= 1.0 + 1e-9
    assert "loss" not in summary and "eval_loss" not in summary  # readers of train/eval records skip it
    # Resume from step 2 (checkpoint 4 lost): step 3 is replayed and traced again, then the window at 7.
    shutil.rmtree(checkpoint.step_dir(run / "checkpoints", 4))
    assert train(run, "steps=8", *args) == 0
    assert first.read_bytes() == original  # never overwritten...
    assert (run / "profile" / "step_00000003" / "rank0.1.json.gz").exists()  # ...the replay goes beside it
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["step_00000003", "step_00000007"]
    assert [(r["step"], r["trace_file"]) for r in traces(run / "metrics.jsonl")] == [
        (3, "profile/step_00000003/rank0.1.json.gz"),  # the first run's record of step 3 was truncated
        (7, "profile/step_00000007/rank0.json.gz"),
    ]
    assert [r["step"] for r in MetricsFile(run / "metrics.jsonl").read() if "loss" in r] == list(range(1, 9))


def test_light_records_say_which_steps_were_traced_and_memory_is_skipped_on_cpu(tmp_path):
    run = tmp_path / "run"
    extra = ("profile.light=true", "profile.trace=[2,4]", "profile.warmup=1", "profile.active=2", "profile.memory=true")
    assert train(run, "steps=5", *extra) == 0
    traced = {r["step"]: r["traced"] for r in read_profile(run / "profile.jsonl")[1]}
    assert traced == {1: False, 2: False, 3: True, 4: True, 5: False}  # step 2 is the warm-up
    assert [r["trace_steps"] for r in traces(run / "metrics.jsonl")] == [[3, 4]]
    assert list((run / "profile" / "step_00000003").iterdir()) == [run / "profile" / "step_00000003" / "rank0.json.gz"]
    assert "profile.memory: the CUDA memory snapshot is skipped on the CPU" in (run / "train.log").read_text()


def test_summary_names_the_heaviest_op():
    a = torch.randn(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            a.mm(a).relu_()
    summary = summarize(prof, on_cuda=False, top=2)
    assert summary["trace_top"][0][0] == "aten::mm" and summary["trace_top"][0][2] > 0.5
    assert len(summary["trace_top"]) == 2 and summary["trace_comm_share"] == 0.0
    assert 0.0 <= summary["trace_idle_share"] < 1.0


def _matmul_flops(model: torch.nn.Module, tokens: torch.Tensor, checkpointed: bool) -> int:
    """torch.profiler's FLOPs of the matmuls (mm, bmm) of one forward + backward."""
    if checkpointed:
        from nanollama.distributed import activation_checkpointing

        activation_checkpointing(model, "full")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    return sum(e.flops or 0 for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm"))


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("attention", ["reference", "sdpa"])
def test_analytical_flops_match_the_profilers_count(monkeypatch, attention, checkpointing):
    """MFU's model FLOPs (and HFU's hardware FLOPs, with full activation checkpointing) against torch.profiler.

    They differ, by design, in two places: the analytical 6N counts every non-embedding parameter as a
    matmul weight, RMSNorm gains included (here 0.3% of N; at scale ~1/dim of it), and torch.profiler counts
    FLOPs only for matmul-like ops, so sdpa's fused CPU kernel (and flash attention on a GPU) is not counted:
    the 12 L H Q T attention term is missing there. The eager reference attention runs as bmm, counted.
    With those accounted for the counts agree exactly (integer FLOPs); the totals within 0.5% / 15%.
    """
    monkeypatch.setenv("NANOLLAMA_ATTENTION", attention)
    cfg = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(cfg)
    B, S = 4, 64
    tokens = torch.randint(cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
    model_fpt, hardware_fpt = flops.per_token(model, S, checkpointing)
    counted = _matmul_flops(model, tokens, checkpointing == "full")
    gains = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 1)
    attn_fpt = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * S  # forward + backward
    recompute_attn_fpt = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * S  # the second forward
    block_gains = sum(p.numel() for p in model.layers.parameters() if p.dim() == 1)
    expected = hardware_fpt - 6 * gains  # per token
    if checkpointing == "full":
        expected -= 2 * block_gains  # recompute_flops_per_token also counts the blocks' gains as weights
    if attention == "sdpa":
        expected -= attn_fpt + (recompute_attn_fpt if checkpointing == "full" else 0)
    assert counted == expected * B * S
    tolerance = 0.005 if attention == "reference" else 0.15
    assert counted == pytest.approx(hardware_fpt * B * S, rel=tolerance)
    assert hardware_fpt > model_fpt if checkpointing == "full" else hardware_fpt == model_fpt


def test_trainer_trace_flops_agree_with_the_mfu_formula(tmp_path, monkeypatch):
    """The same check through the trainer: profile.with_flops on one traced step, against the FLOPs per token
    the trainer's MFU uses. The profiler also counts elementwise adds and muls (AdamW's update among them:
    about 10 FLOPs per parameter, large against this tiny model's 128 tokens a step), hence 3%."""
    monkeypatch.setenv("NANOLLAMA_ATTENTION", "reference")
    run = tmp_path / "run"
    assert train(run, "steps=3", "profile.trace=[2,2]", "profile.warmup=0", "profile.with_flops=true") == 0
    [summary] = traces(run / "metrics.jsonl")
    cfg = parse([str(run / "config.yaml")])
    with torch.device("meta"):
        model_fpt, _ = flops.per_token(Transformer(cfg.model), cfg.data.seq_len, "none")
    assert summary["trace_flops_per_step"] == pytest.approx(model_fpt * TOKENS, rel=0.03)


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("trace", [5, 2], "profile.trace"),
        ("trace", [0, 3], "profile.trace"),
        ("trace", [2, 2], "profile.trace"),  # 1 step < wait 0 + warmup 1 + active 1
        ("active", 0, "profile.active"),
        ("light_every", 0, "profile.light_every"),
        ("memory", True, "profile.memory"),  # no trace to snapshot
        ("every", 3, "profile.every"),  # with trace [2, 5]: windows would overlap
        ("top", 0, "profile.top"),
    ],
)
def test_bad_profile_values_name_the_field(key, value, field):
    section = {key: value}
    if key == "every":
        section["trace"] = [2, 5]
    with pytest.raises(ConfigError) as e:
        build(ProfileConfig, section, "profile")
    assert e.value.field == field


def test_bad_profile_value_exits_2_with_one_line(tmp_path, capsys):
    assert train(tmp_path / "run", "profile.trace=[4,1]") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: profile.trace: must be [start, stop] with stop >= start") and err.count("\n") == 1
    assert not (tmp_path / "run" / "profile.jsonl").exists()


def test_window_repeats_every_n_steps():
    cfg = ProfileConfig(trace=(10, 12), every=100)
    assert [cfg.window_at(s) for s in (9, 10, 12, 13, 110, 112, 113)] == [None, (10, 12), (10, 12), None] + [
        (110, 112),
        (110, 112),
        None,
    ]
    assert ProfileConfig(trace=(10, 12)).window_at(110) is None  # every=0: once


def test_a_trace_that_cannot_be_written_does_not_stop_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "profile").write_text("a file where the traces' folder would go")
    assert train(run, "steps=3", "profile.trace=[2,2]", "profile.warmup=0") == 0
    assert "trace of steps 2-2 not written" in (run / "train.log").read_text()
    assert traces(run / "metrics.jsonl") == []


@pytest.mark.slow
def test_two_ranks_write_their_own_profile_and_trace(tmp_path):
    """torchrun, 2 gloo processes: profile.rank1.jsonl beside profile.jsonl, a trace per rank, and the
    summary (rank 0's) sees FSDP's collectives."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "NANOLLAMA_ATTENTION": "sdpa"}
    run = tmp_path / "run"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    extra = ["steps=3", "profile.light=true", "profile.trace=[2,2]", "profile.warmup=0", "data.batch_size=4"]
    command = [sys.executable, *launcher, "-m", "nanollama.train", str(CONFIG), *tiny(), f"run_dir={run}", *extra]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("profile.jsonl", "profile.rank1.jsonl"):
        header, records = read_profile(run / name)
        assert header == schema_line() and [r["step"] for r in records] == [1, 2, 3]
        assert all(r["tokens"] == TOKENS for r in records)  # 2 ranks x 4 rows x 16
    assert sorted(p.name for p in (run / "profile" / "step_00000002").iterdir()) == ["rank0.json.gz", "rank1.json.gz"]
    [summary] = traces(run / "metrics.jsonl")
    assert 0.0 < summary["trace_comm_share"] < 1.0


@pytest.mark.gpu
def test_on_a_gpu_records_cuda_memory_and_kernels_and_a_memory_snapshot(tmp_path):
    """Untested on the CPU machines (skipped there): CUDA memory fields, kernel-level summary, the snapshot."""
    run = tmp_path / "run"
    extra = ("device=cuda", "profile.light=true", "profile.trace=[2,3]", "profile.memory=true")
    assert main([str(CONFIG), *tiny(), f"run_dir={run}", "steps=4", *extra]) == 0
    records = read_profile(run / "profile.jsonl")[1]
    assert all(r["mem_kind"] == "cuda" and r["mem_peak_bytes"] > 0 for r in records)
    [summary] = traces(run / "metrics.jsonl")
    assert summary["trace_time"] == "cuda" and summary["trace_top"]
    assert (run / "profile" / "step_00000003" / "rank0.memory.pickle").stat().st_size > 0


def test_tracer_follows_global_steps_and_a_resume_inside_a_window(tmp_path):
    cfg = ProfileConfig(trace=(3, 6), wait=1, warmup=1, active=1)  # from step 3: wait 3, warm-up 4, record 5, wait 6
    summaries = []

    def steps(tracer, first, last):
        a = torch.randn(64, 64)
        for step in range(first, last + 1):
            tracer.begin(step)
            a.mm(a)
            tracer.end()
        tracer.close()

    steps(Tracer(cfg, tmp_path / "a", 0, torch.device("cpu"), summaries.append, lambda line: None), 1, 8)
    assert [s["trace_steps"] for s in summaries] == [[5, 5]]
    assert (tmp_path / "a" / "profile" / "step_00000005" / "rank0.json.gz").exists()
    # Resumed at step 4, inside the window: the schedule starts there (wait 4, warm-up 5, record 6).
    summaries.clear()
    steps(Tracer(cfg, tmp_path / "b", 0, torch.device("cpu"), summaries.append, lambda line: None), 4, 8)
    assert [s["trace_steps"] for s in summaries] == [[6, 6]]
    assert Tracer(ProfileConfig(trace=(3, 6), ranks=[1]), tmp_path, 0, torch.device("cpu"), None).on is False
