"""The launcher's config (`launcher` section) and the command line that fills it.

A launch file has two sections: `launcher` (how and where to run) and `run` (the training config,
inline or as a path to a YAML file); a plain training config in its place is launched as is. Both
command-line forms end in the same `Launch`:

    python -m nanollama.launcher CONFIG [key=value ...]
    python -m nanollama.launcher script=nanollama.train config=configs/gssm/base.yaml launcher=bash torchrun=True

Bare keys are routed by name: `config` is the run config's path, a launcher field (`launcher`,
`torchrun`, `nodes`, `grid.seed`, ...) or a Slurm field (`partition`, `time`, ...) goes to the
launcher section, and anything else (`steps`, `optim.lr`, ...) overrides the run config. The
explicit prefixes `launcher.` and `run.` always work.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nanollama import config
from nanollama.config import ConfigError, check, read_yaml

# The run-config schema of the scripts we know; other scripts get their `run` section unchecked.
SCRIPT_CONFIGS = {"nanollama.train": "nanollama.train.config:TrainConfig"}


@dataclass
class SlurmConfig:
    partition: str | None = None
    time: int | None = None  # minutes; None leaves the partition's default limit
    mem: str | None = None  # per node, as sbatch --mem takes it: "64G", "0" (all of it)
    cpus_per_task: int | None = None
    gpus: str | None = None  # --gpus-per-node request ("a100:8"); None asks for gpus_per_node GPUs
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    signal_time: int = 120  # seconds before the time limit at which the batch script gets USR1
    max_parallel: int | None = None  # array tasks running at once (the %N of --array)
    extra: list[str] = field(default_factory=list)  # more sbatch lines: "--mail-type=END"

    def __post_init__(self):
        check(self.time is None or self.time >= 1, "time", f"must be >= 1 minute, got {self.time}")
        check(
            self.cpus_per_task is None or self.cpus_per_task >= 1,
            "cpus_per_task",
            f"must be >= 1, got {self.cpus_per_task}",
        )
        check(self.signal_time >= 0, "signal_time", f"must be >= 0 seconds, got {self.signal_time}")
        check(
            self.max_parallel is None or self.max_parallel >= 1,
            "max_parallel",
            f"must be >= 1, got {self.max_parallel}",
        )
        for i, line in enumerate(self.extra):
            check(line.strip().startswith(("-", "#SBATCH")), f"extra.{i}", f"expected an sbatch option, got {line!r}")


@dataclass
class LauncherConfig:
    name: str = "run"  # the Slurm job name; the default log_dir is logs/{name}
    log_dir: str = ""  # default: logs/{name}, relative to the directory the launcher runs in
    script: str = "nanollama.train"  # module run as `python -m script tasks/{id}.yaml`
    launcher: Literal["slurm", "bash"] = "slurm"
    torchrun: bool = False
    nodes: int = 1
    gpus_per_node: int = 1  # processes per node under torchrun (0: CPU, one process per node)
    tp: int = 1  # tensor-parallel degree, set as the run's parallel.tp; a node holds whole groups (gpus_per_node)
    overwrite: bool = False  # replace an existing log directory
    # relaunch into an existing log directory: keep its tasks (ids, run dirs, code snapshot), add the new
    # grid points, and run only the tasks not done (unfinished ones resume from their checkpoints)
    extend: bool = False
    progress_every: int = 30  # bash: seconds between a running task's progress lines (step, loss); 0: none
    grid: dict[str, Any] = field(default_factory=dict)  # dotted run-config key -> list of values
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self):
        plain = bool(re.fullmatch(r"[\w.+-]+", self.name))
        check(plain, "name", f"must be a plain word ([A-Za-z0-9_.+-]), got {self.name!r}")
        check(
            bool(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", self.script)),
            "script",
            f"must be a module name like nanollama.train, got {self.script!r}",
        )
        check(self.nodes >= 1, "nodes", f"must be >= 1, got {self.nodes}")
        check(self.gpus_per_node >= 0, "gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        check(
            not (self.extend and self.overwrite),
            "extend",
            "extend=true keeps the log directory and overwrite=true replaces it: choose one",
        )
        check(self.progress_every >= 0, "progress_every", f"must be >= 0 seconds, got {self.progress_every}")
        self._check_tp()
        check(
            self.launcher == "slurm" or self.nodes == 1,
            "nodes",
            f"launcher=bash runs on this machine only, so nodes must be 1 (got {self.nodes})",
        )
        if not self.log_dir:
            self.log_dir = f"logs/{self.name}"
        self.grid = flatten_grid(self.grid)
        for key, values in self.grid.items():
            check(isinstance(values, list), f"grid.{key}", f"expected a list of values, got {values!r}")
            check(len(values) > 0, f"grid.{key}", "is an empty list: give at least one value")
        check("run_dir" not in self.grid, "grid.run_dir", "is set by the launcher (log_dir/runs/{id}/)")

    def _check_tp(self) -> None:
        """tp > 1: each node runs whole tensor-parallel groups, so it asks for a multiple of tp GPUs."""
        check(self.tp >= 1, "tp", f"must be >= 1, got {self.tp}")
        if self.tp == 1:
            return
        check(self.torchrun or self.launcher == "slurm", "tp", f"tp={self.tp} needs torchrun=true (or launcher=slurm)")
        if self.gpus_per_node == 1:  # the default: raised to one group per node
            self.gpus_per_node = self.tp
        check(
            self.gpus_per_node >= self.tp and self.gpus_per_node % self.tp == 0,
            "gpus_per_node",
            f"{self.gpus_per_node} must be a multiple of tp={self.tp} (a tensor-parallel group stays inside a node)",
        )

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)


def flatten_grid(grid: dict, prefix: str = "") -> dict[str, Any]:
    """`{optim: {lr: [..]}}` (what `grid.optim.lr=[..]` on the command line builds) -> `{"optim.lr": [..]}`."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_grid(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


@dataclass
class _LaunchFile:
    """The schema of a launch file, used to route and check `launcher.*` overrides."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run: Any = None


@dataclass
class Launch:
    """Everything one launch needs: the launcher settings and the base run config as plain data."""

    cfg: LauncherConfig
    run: dict  # the base training config (before the grid), as plain data
    run_class: type | None  # its dataclass when the script is known, else None
    run_source: str  # where `run` came from (a path, or "inline")


USAGE = (
    "usage: python -m nanollama.launcher CONFIG [key=value ...] [--dry-run]\n"
    "   or: python -m nanollama.launcher config=RUN_CONFIG [launcher=bash] [torchrun=True] [key=value ...]"
)
_LAUNCHER_KEYS = {f.name for f in dataclasses.fields(LauncherConfig)}
_SLURM_KEYS = {f.name for f in dataclasses.fields(SlurmConfig)}


def launcher_typo(key: str, shown: str, run_keys=()) -> ConfigError | None:
    """An unknown key that is closest to a launcher or Slurm key (both routed from the bare name): say which.

    `shown` is the prefix the suggestion is written with ("" for a bare key, "launcher." inside the
    launcher section, where a Slurm key lives under slurm.). None when nothing is close, or when a
    run-config key (`run_keys`) is closer: the run config's own error names it.
    """
    head = key.split(".")[0]
    hint = config.suggest(head, [*_LAUNCHER_KEYS, *_SLURM_KEYS, *run_keys], "")
    close = hint.split("'")[1] if hint.startswith(" (did you mean") else None
    if close is None or close in run_keys:
        return None
    routed = close if close in _LAUNCHER_KEYS or not shown else f"slurm.{close}"
    return ConfigError(f"{shown}{key}", f"unknown key (did you mean '{shown}{routed}'?)")


def _check_launcher_keys(data: dict) -> None:
    """Typos in the launcher section of a launch file, with the Slurm keys among the suggestions."""
    for key in data:
        if str(key) not in _LAUNCHER_KEYS:
            error = launcher_typo(str(key), "launcher.")
            if error is not None:
                raise error


def run_class_for(script: str) -> type | None:
    target = SCRIPT_CONFIGS.get(script)
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def route(key: str) -> tuple[str, str]:
    """Which section a command-line key belongs to: ("launcher" | "run" | "config", dotted key inside it)."""
    if key in ("config", "run"):
        return "config", ""
    head, _, rest = key.partition(".")
    if head == "launcher" and rest:
        return "launcher", rest
    if head == "run" and rest:
        return "run", rest
    if head in _LAUNCHER_KEYS:
        return "launcher", key
    if head in _SLURM_KEYS:
        return "launcher", f"slurm.{key}"
    return "run", key


def parse(argv: list[str]) -> Launch:
    """The launch a command line asks for (without `--dry-run`); raises ConfigError on anything wrong."""
    if not argv:
        raise ConfigError("", f"nothing to launch\n{USAGE}")
    data: dict = {}
    base = Path.cwd()
    if "=" not in argv[0]:
        path = Path(argv[0])
        data = read_yaml(path)
        if not {"launcher", "run"} & set(data):
            data = {"launcher": {}, "run": str(path)}  # a plain training config: launch it as is
        else:
            unknown = set(data) - {"launcher", "run"}
            if unknown:
                raise ConfigError(
                    sorted(unknown)[0], f"unknown section in {path}; a launch file has launcher: and run:"
                )
            data = {"launcher": data.get("launcher") or {}, "run": data.get("run")}
        base, argv = path.parent, argv[1:]
    else:
        data = {"launcher": {}, "run": None}
    if not isinstance(data["launcher"], dict):
        raise ConfigError("launcher", f"expected a mapping, got {data['launcher']!r}")

    run_overrides = []
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("", f"expected key=value, got {item!r}\n{USAGE}")
        section, dotted = route(key)
        if section == "config":
            data["run"], base = value, Path.cwd()
        elif section == "launcher" and dotted.startswith("grid."):
            # A dotted run-config key inside the grid: kept whole, not walked as a schema path.
            grid = data["launcher"].setdefault("grid", {})
            if not isinstance(grid, dict):
                raise ConfigError("launcher.grid", f"expected a mapping, got {grid!r}")
            grid[dotted.removeprefix("grid.")] = yaml.safe_load(value)
        elif section == "launcher":
            if key.startswith("launcher.") and dotted.split(".")[0] not in _LAUNCHER_KEYS:
                _check_launcher_keys({dotted.split(".")[0]: None})
            config.apply_override(data, f"launcher.{dotted}", value, _LaunchFile)
        else:
            run_overrides.append((dotted, value, key.startswith("run.")))

    run_source = "inline"
    if data["run"] is None:
        raise ConfigError("run", f"no training config: give config=PATH or a run: section\n{USAGE}")
    if isinstance(data["run"], str):
        run_source = str(_find(data["run"], base))
        data["run"] = read_yaml(Path(run_source))
    if not isinstance(data["run"], dict):
        raise ConfigError("run", f"expected a mapping or a path to a YAML file, got {data['run']!r}")
    launcher_data = data["launcher"]
    _check_launcher_keys(launcher_data)
    if "name" not in launcher_data and run_source != "inline":
        launcher_data["name"] = Path(run_source).stem
    cfg = config.build(LauncherConfig, launcher_data, "launcher")

    run_class = run_class_for(cfg.script)
    run = copy.deepcopy(data["run"])
    if cfg.tp > 1:  # the launcher's tp is the run's (a run override below may not contradict it)
        set_plain(run, "parallel.tp", cfg.tp)
    for dotted, value, explicit in run_overrides:
        try:
            if run_class is not None:
                config.apply_override(run, dotted, value, run_class)
            else:
                set_plain(run, dotted, yaml.safe_load(value))
        except ConfigError as e:
            if "unknown key" in e.reason and not explicit and "." not in e.field:
                # A bare key known to neither config: perhaps a mistyped launcher key (partiton=...).
                run_keys = [f.name for f in dataclasses.fields(run_class)] if run_class is not None else []
                error = launcher_typo(dotted, "", run_keys)
                if error is not None:
                    raise error from None
            raise e.under("run") from None
    if cfg.tp > 1 and (run.get("parallel") or {}).get("tp", cfg.tp) != cfg.tp:
        raise ConfigError("tp", f"is {cfg.tp} but the run sets parallel.tp={run['parallel']['tp']}: set one of them")
    return Launch(cfg=cfg, run=run, run_class=run_class, run_source=run_source)


def set_plain(data: dict, dotted: str, value: Any, must_exist: bool = False) -> None:
    """Set a dotted key in plain nested data (for scripts whose config schema we do not know)."""
    keys = dotted.split(".")
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key) if isinstance(node, dict) else None
        if child is None and not must_exist and isinstance(node, dict):
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: depth + 1]), "is not a section of the run config")
        node = child
    if must_exist and keys[-1] not in node:
        raise ConfigError(dotted, "is not a key of the run config")
    node[keys[-1]] = value


def _find(path: str, base: Path) -> Path:
    """A run-config path as given, else relative to the launch file that names it."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate.resolve()
    if (base / candidate).is_file():
        return (base / candidate).resolve()
    return candidate  # read_yaml reports it missing
