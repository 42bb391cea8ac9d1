"""Models, selected by `model.arch` through the registry (registry.py).

Built in: `transformer` (models/transformer/); the recurrent `mingru`, `minlstm`, `hawk`, `mamba2`
and `hybrid` (each its own package on models/recurrent/). Another family registers its ModelSpec with
`nanollama.models.register(...)`, in its own package or even from a script or a test.
"""

from nanollama.models import hawk, hybrid, mamba2, mingru, minlstm, transformer
from nanollama.models.registry import (
    ModelSpec,
    TensorParallelPlan,
    archs,
    build,
    check_tensor_parallel,
    config_class,
    default_config,
    get,
    register,
    reset_parameters,
    spec_of,
)

register(transformer.SPEC)
for _arch in (mingru, minlstm, hawk, mamba2, hybrid):
    register(_arch.SPEC)

__all__ = [
    "ModelSpec",
    "TensorParallelPlan",
    "archs",
    "build",
    "check_tensor_parallel",
    "config_class",
    "default_config",
    "get",
    "register",
    "reset_parameters",
    "spec_of",
]
