"""gemma-circuits: attribution graphs and circuits for Gemma 3.

    import circuits
    lm = circuits.load_model()                      # the embedded gemma-3-270m
    graph = circuits.attribute(lm, "Fact: Michael Jordan plays the sport of")
    pruned = circuits.prune(graph)
    print(circuits.explain(pruned).paths[0])      # the strongest path to the top logit

The top layer: stands on `transcoders` and `gemma_lm` (docs/development.md draws the layers).
"""

from gemma_lm import __version__
from gemma_lm.errors import UserError
from gemma_lm.models import DEFAULT_MODEL, LoadedModel, ModelSites, load_model

from .attribution import AttributionConfig, attribute
from .comparison import compare
from .explain import Explanation, explain
from .graph import AttributionGraph, load_graph
from .interventions import intervene
from .pruning import prune

__all__ = [
    "AttributionConfig",
    "AttributionGraph",
    "DEFAULT_MODEL",
    "Explanation",
    "LoadedModel",
    "ModelSites",
    "UserError",
    "__version__",
    "attribute",
    "compare",
    "explain",
    "intervene",
    "load_graph",
    "load_model",
    "prune",
]
