"""Damaged checkpoints, leftovers of interrupted writes, full disks and stop signals during start-up
(in-process tiny trainings on the CPU, a few seconds each)."""

import errno
import json
import os
import shutil
import signal

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs
from tiny_run import CONFIG, tiny

from nanollama.models.transformer import Transformer
from nanollama.observe.metrics import MetricsFile
from nanollama.train import checkpoint, relaunch, trainer
from nanollama.train.checkpoint import Checkpointer
from nanollama.train.cli import main, parse
from nanollama.utils import exit_codes

TINY = tiny()


def run(run_dir, *extra) -> int:
    return main([str(CONFIG), *TINY, f"run_dir={run_dir}", *extra])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsFile(run_dir / "metrics.jsonl").read() if "loss" in r}


ARGS = ("steps=6", "checkpoint.every=2", "checkpoint.keep=2", "optim.schedule=constant")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run, and one stopped after step 4 (checkpoints 2 and 4) to damage."""
    root = tmp_path_factory.mktemp("runs")
    assert run(root / "full", *ARGS) == 0
    assert run(root / "base", *ARGS[1:], "steps=4", "checkpoint.keep=5") == 0
    assert checkpoint.complete_steps(root / "base" / "checkpoints") == [2, 4]
    return root


def copy_of(runs, tmp_path):
    shutil.copytree(runs / "base", tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "checkpoints"


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "flipped byte in a shard": ("dcp/__0_0.distcp", flip_byte, "CRC-32"),
    "truncated shard": ("dcp/__0_0.distcp", truncate, "truncated"),
    "missing shard": ("dcp/__0_0.distcp", os.remove, "missing"),
    "truncated metadata": ("dcp/.metadata", truncate, "truncated"),
    "missing train state": ("train_state_rank0.pt", os.remove, "missing"),
    "flipped byte in the train state": ("train_state_rank0.pt", flip_byte, "CRC-32"),
    "garbled marker": ("COMPLETE", truncate, "unreadable marker"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_checkpoint_is_named_set_aside_and_the_run_falls_back(runs, tmp_path, capsys, damage):
    name, spoil, words = DAMAGES[damage]
    run_dir, ckpts = copy_of(runs, tmp_path)
    spoil(ckpts / "step_00000004" / name)
    assert run(run_dir, *ARGS) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "damaged checkpoint" in x)
    assert name.split("/")[-1] in line and words in line and "falling back to step_00000002" in line
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert losses(run_dir) == losses(runs / "full")  # bit-exact from the intact fallback
    # the damaged one is kept for inspection; keep-last-k (2) counted only the run's own checkpoints
    assert (ckpts / "damaged-step_00000004" / "COMPLETE").exists() or name == "COMPLETE"
    assert (ckpts / "damaged-step_00000004").is_dir()
    assert checkpoint.complete_steps(ckpts) == [4, 6]
    assert all(checkpoint.verify(checkpoint.step_dir(ckpts, s)) is None for s in (4, 6))


def test_keep_one_never_deletes_the_intact_fallback_before_a_newer_checkpoint_exists(runs, tmp_path, capsys):
    run_dir, ckpts = copy_of(runs, tmp_path)
    flip_byte(ckpts / "step_00000004" / "dcp" / "__0_0.distcp")
    assert run(run_dir, *ARGS[:2], "checkpoint.keep=1", "steps=3", "optim.schedule=constant") == 0
    assert checkpoint.complete_steps(ckpts) == [3]
    assert (ckpts / "damaged-step_00000004").is_dir()


def test_no_intact_checkpoint_is_a_one_line_error_and_nothing_is_set_aside(runs, tmp_path, capsys):
    run_dir, ckpts = copy_of(runs, tmp_path)
    for step in (2, 4):
        flip_byte(ckpts / f"step_{step:08d}" / "dcp" / "__0_0.distcp")
    assert run(run_dir, *ARGS) == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no intact checkpoint in ")
    assert "step_00000004/dcp/__0_0.distcp: CRC-32" in err and "1 older ones damaged" in err
    assert checkpoint.complete_steps(ckpts) == [2, 4]  # untouched
    assert max(losses(run_dir)) == 4  # no training from scratch over the run's history


def test_load_model_verifies_the_files(runs, tmp_path):
    _, ckpts = copy_of(runs, tmp_path)
    model = Transformer(parse([str(tmp_path / "run" / "config.yaml")]).model)
    checkpoint.load_model(ckpts / "step_00000004", model)
    flip_byte(ckpts / "step_00000004" / "dcp" / "__0_0.distcp")
    with pytest.raises(checkpoint.CheckpointError, match=r"damaged checkpoint: .*__0_0.distcp: CRC-32"):
        checkpoint.load_model(ckpts / "step_00000004", model)


def test_the_marker_records_every_file_with_size_and_crc32(runs):
    path = runs / "base" / "checkpoints" / "step_00000004"
    files = checkpoint.info(path)["files"]
    assert set(files) == {"dcp/.metadata", "dcp/__0_0.distcp", "train_state_rank0.pt"}
    for name, entry in files.items():
        assert entry["size"] == (path / name).stat().st_size > 0
        assert entry["crc32"] == checkpoint.crc32(path / name) and len(entry["crc32"]) == 8


def test_old_checkpoints_without_checksums_load_and_are_checked_for_presence(runs, tmp_path):
    run_dir, ckpts = copy_of(runs, tmp_path)
    for step in (2, 4):  # as written before checksums existed
        marker = ckpts / f"step_{step:08d}" / "COMPLETE"
        meta = json.loads(marker.read_text())
        marker.write_text(json.dumps({"step": meta["step"], "world_size": meta["world_size"]}))
    assert checkpoint.verify(ckpts / "step_00000004") is None
    os.remove(ckpts / "step_00000004" / "train_state_rank0.pt")
    assert checkpoint.verify(ckpts / "step_00000004").endswith("train_state_rank0.pt: missing")
    assert run(run_dir, *ARGS) == 0
    assert losses(run_dir) == losses(runs / "full")


def test_leftovers_of_interrupted_prunes_and_commits_are_cleaned_at_start(runs, tmp_path, capsys):
    run_dir, ckpts = copy_of(runs, tmp_path)
    # kill -9 during a re-save of step 4, between its two renames: the complete checkpoint sits under
    # its .tmp-old- name. It must come back, not be deleted.
    os.rename(ckpts / "step_00000004", ckpts / ".tmp-old-step_00000004")
    (ckpts / "step_00000001").mkdir()  # a prune cut short: marker gone, files left
    (ckpts / "step_00000001" / "train_state_rank0.pt").write_bytes(b"x" * 100)
    (ckpts / ".tmp-step_00000005" / "dcp").mkdir(parents=True)  # a write cut short
    assert run(run_dir, "steps=4", *ARGS[1:]) == 0
    out = capsys.readouterr().out
    assert "finished the commit of step_00000004 (found as .tmp-old-step_00000004)" in out
    assert "removed the leftover step_00000001" in out and "removed the leftover .tmp-step_00000005" in out
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    assert "already at step 4" in out


def fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["shards", "train_state", "COMPLETE"])
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_older_checkpoints(
    runs, tmp_path, monkeypatch, capsys, async_save, writer
):
    run_dir, ckpts = copy_of(runs, tmp_path)
    previous = sum(f.stat().st_size for f in (ckpts / "step_00000004").rglob("*") if f.is_file())
    # the disk fills while step 6 is written
    if writer == "shards":
        monkeypatch.setattr(dcp_fs, "_write_item", fail_with_enospc)
    else:

        def open_but_full(path, mode="r", *args, **kwargs):
            if "w" in mode and writer in str(path):
                fail_with_enospc()
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "open", open_but_full, raising=False)
    code = run(run_dir, *ARGS, f"checkpoint.async_save={async_save}")
    assert code == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: no space left in {ckpts} for the checkpoint of step 6: about ")
    assert f"about {previous / 2**20:.1f} MiB needed" in err and "older checkpoints are intact" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]  # no partial files
    assert all(checkpoint.verify(ckpts / n) is None for n in ("step_00000002", "step_00000004"))


def test_torch_save_on_a_full_disk_is_recognised():
    # torch.save straight to a full disk fails with this, not with ENOSPC (the report)
    assert checkpoint._disk_full(RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos 704 vs 598"))
    assert not checkpoint._disk_full(RuntimeError("something else"))
    try:
        try:
            fail_with_enospc()
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert checkpoint._disk_full(outer)


def test_a_relaunch_on_a_full_disk_clears_leftovers_before_writing_anything(runs, tmp_path, monkeypatch, capsys):
    run_dir, ckpts = copy_of(runs, tmp_path)
    (ckpts / ".tmp-step_00000005" / "dcp").mkdir(parents=True)
    (ckpts / ".tmp-step_00000005" / "dcp" / "__0_0.distcp").write_bytes(b"x" * 1000)
    monkeypatch.setattr(relaunch, "write_atomic", fail_with_enospc)  # config.yaml and its history
    assert run(run_dir, *ARGS) == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"error: run_dir: cannot write {run_dir / 'config.yaml'}: No space left on device\n"
    assert not (ckpts / ".tmp-step_00000005").exists()  # cleaned first: that is what frees the space
    assert checkpoint.complete_steps(ckpts) == [2, 4]


class Killed(Exception):
    pass


@pytest.fixture
def default_signals_raise():
    """Stand-ins for the default deaths by SIGTERM / SIGUSR1 / SIGINT that do not end pytest itself."""

    def die(signum, frame):
        raise Killed(signal.Signals(signum).name)

    previous = {s: signal.signal(s, die) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130)])
def test_a_signal_while_loading_the_checkpoint_exits_cleanly_without_a_new_one(
    runs, tmp_path, monkeypatch, capsys, default_signals_raise, signum, code
):
    run_dir, ckpts = copy_of(runs, tmp_path)
    real = Checkpointer.load

    def load_and_get_signalled(self, *args):
        os.kill(os.getpid(), signum)
        return real(self, *args)

    monkeypatch.setattr(Checkpointer, "load", load_and_get_signalled)
    assert run(run_dir, *ARGS) == code
    out = capsys.readouterr().out
    assert f"stopped by {signal.Signals(signum).name} while loading the checkpoint" in out
    assert checkpoint.complete_steps(ckpts) == [2, 4] and max(losses(run_dir)) == 4
    monkeypatch.undo()
    assert run(run_dir, *ARGS) == 0 and losses(run_dir) == losses(runs / "full")  # and the lock was released


def test_a_signal_while_building_exits_75_before_any_checkpoint(tmp_path, monkeypatch, capsys, default_signals_raise):
    real = trainer.Trainer.build_model

    def build_and_get_signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(trainer.Trainer, "build_model", build_and_get_signalled)
    assert run(tmp_path / "run", *ARGS) == exit_codes.PREEMPTED
    assert "stopped by SIGTERM while building the model and data" in capsys.readouterr().out
    assert checkpoint.complete_steps(tmp_path / "run" / "checkpoints") == []
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
