import subprocess
import sys
from pathlib import Path

import pytest

from nanollama import config
from nanollama.train.cli import parse
from nanollama.train.config import TrainConfig

DEBUG = Path(__file__).parents[1] / "configs" / "gssm" / "debug.yaml"


def error_of(args: list[str]) -> str:
    with pytest.raises(config.ConfigError) as info:
        parse(args)
    return str(info.value)


def test_yaml_then_overrides_with_types():
    cfg = parse([str(DEBUG), "steps=50", "optim.lr=3e-3", "run_dir=runs/try1", "data.gssm.nodes.0.state_dim=16"])
    assert cfg.steps == 50 and isinstance(cfg.steps, int)
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)  # PyYAML alone reads "3e-3" as a string
    assert cfg.run_dir == "runs/try1"
    assert cfg.data.gssm.nodes[0].state_dim == 16
    assert cfg.data.gssm.nodes[1].state_dim == 8  # untouched list items keep the file's values
    assert cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert cfg.model.vocab_size == 32  # derived from the observed node


def test_overrides_of_lists_booleans_and_sections_missing_from_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\n")
    cfg = config.load(TrainConfig, path, ["optim.betas=[0.8, 0.99]", "model.tie_embeddings=true", "eval.every=0"])
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.model.tie_embeddings is True
    assert cfg.eval.every == 0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", "optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        ("stepz=3", "stepz: unknown key (did you mean 'steps'?)"),
        ("steps=abc", "steps: expected an integer, got 'abc'"),
        ("optim.lr=-1", "optim.lr: must be > 0, got -1.0"),
        ("precision=fp64", "precision: must be one of fp32, bf16, fp16; got 'fp64'"),
        ("model.n_heads=3", "model.n_heads: dim=64 is not divisible by n_heads=3"),
        ("model.n_kv_heads=3", "model.n_kv_heads: n_heads=4 is not a multiple of n_kv_heads=3"),
        ("data.gssm.nodes.7.state_dim=3", "data.gssm.nodes.7: no list item 7 (the list has 3 items)"),
        ("data.gssm.nodes.0.alpha=0", "data.gssm.nodes.0.alpha: node 'clock': alpha must be > 0, got 0.0"),
        ("optim.lr.x=1", "optim.lr: is a value, not a section"),
        ("model.vocab_size=10", "model.vocab_size: is 10 but data.source=onfly has 32 tokens"),
        ("data.seq_len=500", "data.seq_len: 500 exceeds model.max_seq_len=128"),
        ("log.every=0", "log.every: must be >= 1, got 0"),
        ("seed=-1", "seed: must be >= 0, got -1"),
        ("data.graph_seed=-2", "data.graph_seed: must be >= 0, got -2"),
    ],
)
def test_bad_values_name_the_dotted_field(override, expected):
    assert expected in error_of([str(DEBUG), override])


def test_bad_graphs_name_the_node():
    assert "unknown parent 'nope'" in error_of([str(DEBUG), "data.gssm.nodes.1.parents=[nope]"])
    assert "cycle" in error_of([str(DEBUG), "data.gssm.nodes.0.mode=default", "data.gssm.nodes.0.parents=[fast]"])
    assert "a slow node cannot have parents" in error_of([str(DEBUG), "data.gssm.nodes.0.parents=[fast]"])
    assert "exactly one node must be observed" in error_of([str(DEBUG), "data.gssm.nodes.1.observed=true"])
    assert "observed node cannot be in slow mode" in error_of([str(DEBUG), "data.gssm.nodes.0.observed=true"])


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  warmpu: 3\n")
    with pytest.raises(config.ConfigError, match=r"optim.warmpu: unknown key \(did you mean 'optim.warmup'\?\)"):
        config.load(TrainConfig, path)


def test_missing_file_and_bad_arguments():
    assert "config file not found: nope.yaml" in error_of(["nope.yaml"])
    assert "expected key=value" in error_of([str(DEBUG), "steps"])
    assert "first argument must be a config file" in error_of(["steps=3"])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse([str(DEBUG), "optim.lr=0.01"])
    path = tmp_path / "config.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(TrainConfig, path) == cfg


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.yaml"], "error: config file not found: missing.yaml"),
        ([str(DEBUG), "optim.lrr=3"], "error: optim.lrr: unknown key (did you mean 'optim.lr'?)"),
    ],
)
@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_code_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "nanollama.train", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("name", ["debug", "base", "sparse", "dense", "low_entropy"])
def test_shipped_configs_load(name):
    cfg = parse([str(DEBUG.parent / f"{name}.yaml")])
    assert cfg.run_dir == f"runs/{name}"
    assert cfg.model.vocab_size == cfg.data.gssm.vocab_size


# ----------------------------------------------------------------------------- reliability: one line per bad value


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=[1", "optim.lr: cannot parse '[1' as a YAML value: line 1, column 3:"),
        ("model.rope_scaling={type:", "model.rope_scaling: cannot parse '{type:' as a YAML value"),
        ("seed=9223372036854775808", "seed: must be < 2**63 (a 64-bit seed), got 9223372036854775808"),
        ("data.graph_seed=9223372036854775808", "data.graph_seed: must be < 2**63"),
        ("optim.lr=1e39", "optim.lr: must be a finite number within float32's range (|x| <= 3.4e38), got '1e39'"),
        ("optim.lr=inf", "optim.lr: must be a finite number within float32's range"),
        ("optim.lr=.nan", "optim.lr: must be a finite number within float32's range"),
        ("model.norm_eps=inf", "model.norm_eps: must be a finite number"),
        ("optim.betas=[0.9, .inf]", "optim.betas.1: must be a finite number"),
        ("threads=0", "threads: must be >= 1 (or null), got 0"),
    ],
)
def test_overrides_that_used_to_traceback_or_overflow_name_the_field(override, expected):
    assert expected in error_of([str(DEBUG), override])


def test_an_unquoted_mapping_split_by_the_shell_is_a_one_line_error():
    # the shell turns model.rope_scaling={type: linear} into two arguments
    message = error_of([str(DEBUG), "model.rope_scaling={type:", "linear}"])
    assert message.startswith("model.rope_scaling: cannot parse '{type:'") and "quote the whole key=value" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: 5\n", "model: expected a mapping for TransformerConfig, got int 5"),
        ("optim: [1, 2]\n", "optim: expected a mapping for OptimConfig, got list [1, 2]"),
        ("steps: 3\noptim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice, on lines 3 and 4"),
        ("steps: 3\nsteps: 4\n", "key 'steps' is given twice, on lines 1 and 2"),
        ("optim:\n  lr: [1\n", "is not valid YAML: line 3, column 1:"),
    ],
)
def test_bad_yaml_files_name_the_field_or_the_line(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(TrainConfig, path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_section_given_as_a_scalar_then_overridden_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: 5\n")
    with pytest.raises(config.ConfigError, match=r"^model: expected a mapping \(a section\), got 5$"):
        config.load(TrainConfig, path, ["model.dim=8"])


def test_non_utf8_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"steps: 3\nrun_dir: caf\xe9\n")
    with pytest.raises(config.ConfigError, match=r"c.yaml is not UTF-8 text \(byte 0xe9 on line 2\)$"):
        config.load(TrainConfig, path)


def test_config_equals_path_anywhere_like_the_original():
    cfg = parse([f"config={DEBUG}", "steps=50", "optim.lr=3e-3"])
    assert cfg.steps == 50 and cfg.optim.lr == 3e-3 and cfg.run_dir == "runs/debug"
    cfg = parse(["steps=7", f"config={DEBUG}"])
    assert cfg.steps == 7
    assert "config: given twice" in error_of([str(DEBUG), f"config={DEBUG}"])
    assert "config: given 2 times" in error_of([f"config={DEBUG}", f"config={DEBUG}"])


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    from nanollama.train.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    # generated from the dataclasses: every leaf key of the resolved default config appears
    leaves = set()

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, key)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for i, item in enumerate(v):
                    walk(item, f"{key}.{i}")
            else:
                leaves.add(key)

    walk(config.to_dict(TrainConfig()), "")
    assert leaves <= set(lines), leaves - set(lines)
    assert lines["optim.warmup"].split()[1] == "100" and "linear warm-up" in lines["optim.warmup"]
    assert lines["model.vocab_size"].split()[1] == "null"  # the field's default, not one derived from the data
    assert lines["threads"].split()[1] == "null"
    assert "data.path" in lines and "--help model.arch=NAME data.source=NAME" in out
    assert main(["--help", "data.source=nope"]) == 2
    assert "data.source: unknown data source 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        ([f"config={DEBUG}", "optim.lr=[1"], "error: optim.lr: cannot parse '[1' as a YAML value: line 1, column 3: "),
        ([f"config={DEBUG}", "seed=9223372036854775808"], "error: seed: must be < 2**63 (a 64-bit seed)"),
        ([str(DEBUG), "optim.lr=1e39"], "error: optim.lr: must be a finite number within float32's range"),
    ],
)
@pytest.mark.slow
def test_cli_reliability_errors_are_one_line_with_exit_code_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "nanollama.train", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr + proc.stdout
