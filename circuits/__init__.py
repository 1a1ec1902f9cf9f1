"""gemma-circuits: attribution graphs and circuits for Gemma 3.

import circuits
lm = circuits.load_model()                      # the embedded gemma-3-270m
graph = circuits.attribute(lm, "Fact: Michael Jordan plays the sport of")
pruned = circuits.prune(graph)
"""

__version__ = "0.1.0"

from .errors import UserError
from .graph import AttributionGraph, load_graph
from .models import DEFAULT_MODEL, LoadedModel, ModelSites, load_model, tiny_model

__all__ = [
    "AttributionGraph",
    "load_graph",
    "load_model",
    "tiny_model",
    "LoadedModel",
    "ModelSites",
    "UserError",
    "DEFAULT_MODEL",
    "__version__",
]


def __getattr__(name):  # later stages import lazily so `import circuits` stays fast
    lazy = {
        "attribute": "attribution",
        "AttributionConfig": "attribution",
        "prune": "prune",
        "compare": "compare",
        "intervene": "interventions",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(name)


# `circuits.prune` / `circuits.compare` must be the functions even after their submodules of the same name
# are imported (an import binds the submodule onto the package, hiding __getattr__); both are light.
from .compare import compare  # noqa: E402
from .prune import prune  # noqa: E402
