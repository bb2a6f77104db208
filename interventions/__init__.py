"""Training-free attention interventions for Hugging Face VLMs and LLMs.

    import interventions as iv
    h = iv.wrap(model, "pai", alpha=0.2)   # the user's own model.generate(...) now applies PAI
    h.unwrap()                             # bit-identical to the original model again
"""

from .api import Handle, apply, describe, families, family, method_params, methods, unwrap, wrap
from .errors import AlreadyWrappedError, ConfigError, InputError, InterventionError, UnsupportedFamilyError
from .version import __version__

__all__ = [
    "AlreadyWrappedError", "ConfigError", "Handle", "InputError", "InterventionError", "UnsupportedFamilyError",
    "__version__", "apply", "describe", "families", "family", "method_params", "methods", "unwrap", "wrap",
]
