"""Grid expansion, task resolution and the two command-line forms."""

from pathlib import Path

import pytest
import yaml
from launcher_helpers import DEBUG

from nanollama import config
from nanollama.config import ConfigError
from nanollama.launcher import grid, spec
from nanollama.train.config import TrainConfig


def test_expand_is_the_cartesian_product_first_key_slowest():
    points = grid.expand({"optim.lr": [1e-3, 3e-3], "seed": [0, 1, 2]})
    assert points == [{"optim.lr": lr, "seed": s} for lr in (1e-3, 3e-3) for s in (0, 1, 2)]
    assert grid.expand({}) == [{}]


def test_resolve_writes_one_valid_config_per_task_with_its_own_run_dir(tmp_path):
    run = yaml.safe_load(DEBUG.read_text())
    g = {"optim.lr": ["1e-3", 3e-3], "model.dim": [32, 64], "seed": [5]}
    tasks = grid.resolve(run, g, TrainConfig, tmp_path / "logs")
    assert [t.id for t in tasks] == [0, 1, 2, 3]
    seen = set()
    for t in tasks:
        assert t.text.startswith(f"# task {t.id}: ")
        path = tmp_path / f"{t.id}.yaml"
        path.write_text(t.text)
        cfg = config.load(TrainConfig, path)  # a task file is a plain training config
        assert cfg.run_dir == str(tmp_path / "logs" / "runs" / str(t.id))
        assert t.run_dir == Path(cfg.run_dir)
        assert (cfg.optim.lr, cfg.model.dim, cfg.seed) == (t.point["optim.lr"], t.point["model.dim"], 5)
        assert isinstance(t.point["optim.lr"], float)  # "1e-3" (a YAML string) typed by the config
        assert cfg.steps == run["steps"] and cfg.model.n_heads == run["model"]["n_heads"]  # the rest untouched
        seen.add((cfg.optim.lr, cfg.model.dim))
    assert seen == {(1e-3, 32), (1e-3, 64), (3e-3, 32), (3e-3, 64)}
    assert run["run_dir"] == "runs/debug"  # the base config is not modified


def test_grid_key_not_in_the_run_config_is_named_with_a_suggestion(tmp_path):
    run = yaml.safe_load(DEBUG.read_text())
    with pytest.raises(ConfigError) as e:
        grid.resolve(run, {"seed": [0], "optim.lrr": [1e-3]}, TrainConfig, tmp_path)
    assert e.value.field == "launcher.grid.optim.lrr"
    assert "not a key of the run config" in str(e.value) and "did you mean" in str(e.value) and "lr'?" in str(e.value)


def test_grid_value_invalid_for_the_run_config_names_the_field_and_task(tmp_path):
    run = yaml.safe_load(DEBUG.read_text())
    with pytest.raises(ConfigError) as e:
        grid.resolve(run, {"data.batch_size": [8, 0]}, TrainConfig, tmp_path)
    assert e.value.field == "run.data.batch_size"
    assert "task 1" in str(e.value) and "data.batch_size=0" in str(e.value)


def test_grid_for_a_script_without_a_known_schema_checks_keys_in_the_data(tmp_path):
    run = {"steps": 3, "opt": {"lr": 0.1}}
    tasks = grid.resolve(run, {"opt.lr": [0.1, 0.2]}, None, tmp_path)
    assert [yaml.safe_load(t.text)["opt"]["lr"] for t in tasks] == [0.1, 0.2]
    assert yaml.safe_load(tasks[1].text)["run_dir"] == str(tmp_path / "runs" / "1")
    with pytest.raises(ConfigError, match="launcher.grid.opt.mu"):
        grid.resolve(run, {"opt.mu": [1]}, None, tmp_path)


@pytest.mark.parametrize(
    "grid, field, message",
    [
        ({"seed": []}, "grid.seed", "empty list"),
        ({"seed": 3}, "grid.seed", "expected a list"),
        ({"optim": {"lr": []}}, "grid.optim.lr", "empty list"),  # nested, as grid.optim.lr=[] builds it
    ],
)
def test_bad_grid_lists_are_refused(grid, field, message):
    with pytest.raises(ConfigError, match=message) as e:
        config.build(spec.LauncherConfig, {"grid": grid})
    assert e.value.field == field


def test_run_dir_cannot_be_a_grid_key():
    with pytest.raises(ConfigError, match="set by the launcher"):
        config.build(spec.LauncherConfig, {"grid": {"run_dir": ["a", "b"]}})


def test_short_form_and_launch_file_give_the_same_launch(tmp_path):
    short = spec.parse(
        [
            "script=nanollama.train",
            f"config={DEBUG}",
            "launcher=bash",
            "torchrun=True",
            "gpus_per_node=0",
            "grid.seed=[0,1]",
            "grid.optim.lr=[1e-3]",
            "steps=7",
            "partition=dev",
        ]
    )
    launch_file = tmp_path / "sweep.yaml"
    launch_file.write_text(
        yaml.safe_dump(
            {
                "launcher": {
                    "name": "debug",
                    "launcher": "bash",
                    "torchrun": True,
                    "gpus_per_node": 0,
                    "grid": {"seed": [0, 1], "optim.lr": ["1e-3"]},
                    "slurm": {"partition": "dev"},
                },
                "run": str(DEBUG),
            }
        )
    )
    long = spec.parse([str(launch_file), "run.steps=7"])
    assert config.to_dict(short.cfg) == config.to_dict(long.cfg)
    assert short.run == long.run and short.run["steps"] == 7
    assert short.cfg.name == "debug" and short.cfg.log_dir == "logs/debug"  # defaults from the config's name
    assert short.cfg.slurm.partition == "dev" and short.cfg.launcher == "bash" and short.cfg.torchrun is True
    assert short.run_class is TrainConfig


def test_inline_run_and_paths_relative_to_the_launch_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(DEBUG.read_text())
    (tmp_path / "a.yaml").write_text("launcher: {launcher: bash}\nrun: configs/tiny.yaml\n")
    launch = spec.parse([str(tmp_path / "a.yaml"), "launcher.nodes=1", "optim.lr=0.01"])
    assert launch.run_source == str(tmp_path / "configs" / "tiny.yaml")
    assert launch.cfg.name == "tiny" and launch.run["optim"]["lr"] == 0.01
    (tmp_path / "b.yaml").write_text("launcher: {name: inl}\nrun: {steps: 3, seed: 1}\n")
    launch = spec.parse([str(tmp_path / "b.yaml")])
    assert launch.run == {"steps": 3, "seed": 1} and launch.run_source == "inline" and launch.cfg.name == "inl"


@pytest.mark.parametrize(
    "args, field",
    [
        (["launcher=pbs"], "launcher.launcher"),
        (["nodes=0"], "launcher.nodes"),
        (["launcher=bash", "nodes=2"], "launcher.nodes"),
        (["slurm.time=0"], "launcher.slurm.time"),
        (["slurm.extra=[mail]"], "launcher.slurm.extra.0"),
        (["optim.lrr=1"], "run.optim.lrr"),
        (["name=a b"], "launcher.name"),
    ],
)
def test_bad_values_name_the_dotted_field(args, field):
    with pytest.raises(ConfigError) as e:
        spec.parse([f"config={DEBUG}", *args])
    assert e.value.field == field


def test_a_training_config_in_place_of_a_launch_file_is_launched_as_is():
    launch = spec.parse([str(DEBUG), "launcher=bash", "steps=3"])
    assert launch.run_source == str(DEBUG.resolve()) and launch.cfg.name == "debug"
    assert launch.run["steps"] == 3 and launch.run["model"] == yaml.safe_load(DEBUG.read_text())["model"]


def test_launch_file_with_a_launcher_section_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("launcher: bash\nrun: {steps: 1}\n")
    with pytest.raises(ConfigError, match="expected a mapping") as e:
        spec.parse([str(tmp_path / "a.yaml"), "grid.seed=[1]"])
    assert e.value.field == "launcher"


def test_launch_file_with_an_unknown_section_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("launcher: {}\nrun: {steps: 1}\nslurm: {}\n")
    with pytest.raises(ConfigError, match="unknown section") as e:
        spec.parse([str(tmp_path / "a.yaml")])
    assert e.value.field == "slurm"


def test_missing_run_config_is_reported():
    with pytest.raises(ConfigError, match="no training config"):
        spec.parse(["launcher=bash"])
    with pytest.raises(ConfigError, match="not found"):
        spec.parse(["config=configs/nope.yaml"])
