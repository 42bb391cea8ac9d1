"""The dispatch rule's guards: which Triton interpreters can run here, and availability lookups."""

from __future__ import annotations

import pytest
import torch

from nanollama.kernels import dispatch


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [
        ("3.6.0", "2.4.6", True),  # the GPU image's Triton with today's numpy
        ("3.5.1", "2.4.0", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.6", False),  # fixed there (triton-lang/triton#9171)
        ("3.9.0+git1234", "2.5.0rc1", False),
        ("3.6.0", "1.26.4", False),
    ],
)
def test_interpreter_problem_names_the_versions_and_the_fix(triton_version, numpy_version, broken):
    problem = dispatch.interpreter_problem(triton_version, numpy_version)
    if broken:
        assert problem == (
            f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version}: "
            "install 'numpy<2.4' or 'triton>=3.7'"
        )
    else:
        assert problem is None


def test_forcing_triton_on_the_cpu_with_a_broken_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "interpreter_on", lambda: True)
    monkeypatch.setattr(dispatch, "_interpreter_problem_here", lambda: "Triton 3.6.0's interpreter cannot run")
    with pytest.raises(RuntimeError, match="NANOLLAMA_KERNELS=triton on CPU tensors: Triton 3.6.0's interpreter"):
        dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("NANOLLAMA_KERNELS", "auto")
    assert dispatch.use_triton(torch.zeros(1)) is False  # auto never runs the interpreter


def test_module_found_is_cached_and_constant_to_dynamo():
    assert dispatch.module_found("torch") and not dispatch.module_found("no_such_module_nanollama")
    compiled = torch.compile(lambda x: x + 1 if dispatch.triton_available() else x - 1, fullgraph=True, backend="eager")
    expected = 1.0 if dispatch.triton_available() else -1.0
    assert compiled(torch.zeros(1)).item() == expected  # traced without a graph break (fullgraph)


def test_this_machines_interpreter_runs():
    """The CPU suite runs every Triton kernel under the interpreter: the installed versions must allow it."""
    pytest.importorskip("triton")
    assert dispatch._interpreter_problem_here() is None
