"""gemma-circuits: attribution graphs and circuits for Gemma 3.

    import circuits
    lm = circuits.load_model()                      # the embedded gemma-3-270m
    graph = circuits.attribute(lm, "Fact: Michael Jordan plays the sport of")
    pruned = circuits.prune(graph)
    print(circuits.explain(pruned).paths[0])      # the strongest path to the top logit
    loads = circuits.head_loadings(lm, pruned)      # the heads that carry its edges
    why = circuits.qk(lm, pruned, layer=5, head=0)  # why a head attends where it does

The top layer: stands on `transcoders` and `gemma_lm` (docs/development.md draws the layers).
"""

from gemma_lm import __version__
from gemma_lm.errors import UserError
from gemma_lm.models import DEFAULT_MODEL, LoadedModel, ModelSites, load_model

from .attention import QKAttribution, qk
from .attribution import AttributionConfig, attribute
from .comparison import compare
from .explain import Explanation, explain
from .graph import AttributionGraph, load_graph
from .heads import HeadLoadings, head_loadings
from .interventions import intervene, intervene_each
from .pruning import prune

__all__ = [
    "AttributionConfig",
    "AttributionGraph",
    "DEFAULT_MODEL",
    "Explanation",
    "HeadLoadings",
    "LoadedModel",
    "ModelSites",
    "QKAttribution",
    "UserError",
    "__version__",
    "attribute",
    "compare",
    "explain",
    "head_loadings",
    "intervene",
    "intervene_each",
    "load_graph",
    "load_model",
    "prune",
    "qk",
]
