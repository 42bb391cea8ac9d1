"""Fixtures for the launcher tests: a stand-in task package and a real single-node Slurm cluster."""

from __future__ import annotations

import os

import pytest
from launcher_helpers import ROOT, make_fake_package


@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    src = tmp_path / "src"
    pkg = make_fake_package(src)
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(src), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return pkg


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm for the session (installed with apt when missing; skipped when impossible).

    Set NANOLLAMA_REQUIRE_SLURM=1 to make "impossible" a failure instead (CI).
    """
    from slurm_cluster import SlurmCluster, Unavailable

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    try:
        try:
            cluster.start()
        except Unavailable as e:
            if os.environ.get("NANOLLAMA_REQUIRE_SLURM") == "1":  # CI: these tests must run, not skip
                pytest.fail(f"NANOLLAMA_REQUIRE_SLURM=1 but no Slurm here: {e}")
            pytest.skip(f"no Slurm here: {e}")
        os.environ["SLURM_CONF"] = str(cluster.conf)  # sbatch, squeue, ... in the launcher and its jobs
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
