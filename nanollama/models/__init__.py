"""Models, selected by `model.arch` through the registry (registry.py).

Built in: `transformer` (models/transformer/). Another family registers its ModelSpec with
`nanollama.models.register(...)`, in its own package or even from a script or a test.
"""

from nanollama.models import transformer
from nanollama.models.registry import ModelSpec, archs, build, config_class, get, register, reset_parameters, spec_of

register(transformer.SPEC)
DEFAULT_ARCH = "transformer"  # model.arch when a config leaves it out


def default_config():
    """The `model` section of a config that names no architecture."""
    return config_class(DEFAULT_ARCH)()


__all__ = [
    "DEFAULT_ARCH",
    "ModelSpec",
    "archs",
    "build",
    "config_class",
    "default_config",
    "get",
    "register",
    "reset_parameters",
    "spec_of",
]
