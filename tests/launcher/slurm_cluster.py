"""A real single-node Slurm cluster for the launcher's integration tests, started and stopped by the tests.

Debian 12's slurm-wlm (22.05) and munge, installed with apt when missing (root only; not when
NANOLLAMA_SLURM_INSTALL=0). slurmctld, slurmd and a munged of their own (on a private socket under
/run/munge, named in slurm.conf's AuthInfo) run on localhost, on free ports, with every other file
(config, state, spool, logs, pid files) in one temporary directory: two test sessions on one
machine never share or stop each other's daemons, and the machine's own Slurm or munge setup (if
any) is not touched. Commands find the cluster through SLURM_CONF. Stopped by pid files.

Run by hand to poke at it: `python tests/launcher/slurm_cluster.py` (starts, prints SLURM_CONF,
waits for Enter, stops).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "munge", "unmunge", "sbatch", "scontrol", "sinfo"]
# More CPUs than the machine has (allowed by config_overrides), so several array tasks run at once.
NODE_CPUS = 8


class Unavailable(RuntimeError):
    """Slurm cannot run here (not root, apt failed, a daemon would not start): the tests skip with this."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin") if (p := Path(d) / name).exists()), None
    )


def ensure_installed(log: Path) -> None:
    """Install the Debian packages when a piece is missing (about 10-20 s); Unavailable if we cannot."""
    if all(_which(name) for name in DAEMONS):
        return
    if os.environ.get("NANOLLAMA_SLURM_INSTALL") == "0":
        raise Unavailable("Slurm is not installed and NANOLLAMA_SLURM_INSTALL=0 forbids installing it")
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    if not _which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(log, "ab") as out:
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
        if subprocess.run(install, stdout=out, stderr=out, env=env).returncode != 0:
            # The package lists may be missing or stale: refresh them once and retry.
            subprocess.run(["apt-get", "update", "-qq"], stdout=out, stderr=out, env=env)
            if subprocess.run(install, stdout=out, stderr=out, env=env).returncode != 0:
                raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed (see {log})")
    missing = [name for name in DAEMONS if not _which(name)]
    if missing:
        raise Unavailable(f"installed Slurm but {', '.join(missing)} is still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works(socket: Path) -> bool:
    munge = subprocess.run([_which("munge"), f"--socket={socket}", "-n"], capture_output=True)
    if munge.returncode != 0:
        return False
    unmunge = subprocess.run([_which("unmunge"), f"--socket={socket}"], input=munge.stdout, capture_output=True)
    return unmunge.returncode == 0


class SlurmCluster:
    """slurmctld + slurmd on localhost, everything under `root`. `start()`, then `stop()` (always)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pidfiles = {"slurmd": self.root / "slurmd.pid", "slurmctld": self.root / "slurmctld.pid"}
        self._munged_pidfile: Path | None = None
        self._munge_files: list[Path] = []
        self.munge_socket: Path | None = None

    # ------------------------------------------------------------------ start

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_installed(self.root / "apt.log")
        self._start_munge()
        self._write_conf()
        for name in ("slurmctld", "slurmd"):
            self._pidfiles[name].unlink(missing_ok=True)
        self._daemon(["slurmctld", "-i", "-f", str(self.conf)], "slurmctld")
        self._daemon(["slurmd", "-N", "localhost", "-f", str(self.conf)], "slurmd")
        self._wait_idle(timeout)

    def _start_munge(self) -> None:
        """Our own munged on its own socket (named in slurm.conf), so sessions never share or stop one."""
        if os.geteuid() != 0:
            raise Unavailable("starting munged needs root")
        key = Path("/etc/munge/munge.key")
        if not key.exists():  # the package normally creates it
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        # munged runs as the munge user, which cannot enter pytest's private temporary directories.
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        base = run_dir / f"nanollama-test-{os.getpid()}-{self.root.name}"
        self.munge_socket = Path(f"{base}.socket")
        self._munge_files = [Path(f"{base}.{ext}") for ext in ("socket", "socket.lock", "pid", "seed", "log")]
        self._munged_pidfile = Path(f"{base}.pid")
        argv = [
            "runuser",
            "-u",
            "munge",
            "--",
            _which("munged"),
            f"--socket={self.munge_socket}",
            f"--pid-file={base}.pid",
            f"--seed-file={base}.seed",
            f"--log-file={base}.log",
        ]
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            raise Unavailable(f"munged did not start: {(res.stderr or res.stdout).strip()}")
        deadline = time.monotonic() + 10
        while not _munge_works(self.munge_socket):
            if time.monotonic() > deadline:
                raise Unavailable(f"munged does not answer on {self.munge_socket}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
            (self.root / sub).mkdir()
        r = self.root
        lines = [
            "ClusterName=nanollama-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=600",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN",
            "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, argv: list[str], name: str) -> None:
        argv = [_which(argv[0]), *argv[1:]]
        with open(self.root / f"{name}.out", "ab") as out:
            # The daemons fork into the background and write their pid files.
            proc = subprocess.run(argv, stdout=out, stderr=out, env=self.env, timeout=30)
        if proc.returncode != 0:
            raise Unavailable(f"{name} did not start (exit {proc.returncode}; see {self.root / (name + '.log')})")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            res = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
            state = res.stdout.strip()
            if res.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.3)
        raise Unavailable(f"the Slurm node is not idle after {timeout:.0f} s (state {state!r}; see {self.root})")

    # ------------------------------------------------------------------ use

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, **kw)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop the daemons by their pid files (ours only; SIGKILL after 3 s: their state is thrown away)."""
        pidfiles = [self._pidfiles["slurmd"], self._pidfiles["slurmctld"]]
        if self._munged_pidfile is not None:
            pidfiles.append(self._munged_pidfile)
        pids = [pid for pid in map(self._signal_pidfile, pidfiles) if pid is not None]
        deadline = time.monotonic() + 3.0
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.05)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for sub in ("state", "spool"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for path in self._munge_files:
            path.unlink(missing_ok=True)

    @staticmethod
    def _signal_pidfile(path: Path) -> int | None:
        """SIGTERM the process a pid file names; its pid, or None if there was none."""
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return None
        return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    import tempfile

    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-")))
    t0 = time.monotonic()
    try:
        cluster.start()
        print(f"up in {time.monotonic() - t0:.1f} s\nexport SLURM_CONF={cluster.conf}")
        input("Enter stops it... ")
    finally:
        cluster.stop()
