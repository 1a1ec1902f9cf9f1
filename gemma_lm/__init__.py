"""gemma-circuits' bottom layer: the Gemma 3 language model and its weight store.

Loading models from every source (`load_model`, `LoadedModel`, `ModelSites`), our Gemma 3 forward
pass (`gemma_lm.gemma3`), the weight store that reads memory-mapped safetensors files without making
them resident (`gemma_lm.weights`), and what every layer shares at run time: `UserError`, atomic
files and the cache root (`gemma_lm.files`), the allocator (`gemma_lm.memory`), torchrun ranks
(`gemma_lm.ranks`) and the one path from job configs to command lines (`gemma_lm.cli`).
`transcoders` stands on this package and `circuits` on both; nothing here imports either
(docs/development.md draws the layers).
"""

__version__ = "0.1.0"  # the distribution's version (setup.cfg reads it from here)

from .errors import UserError
from .models import DEFAULT_MODEL, LoadedModel, ModelSites, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelSites", "UserError", "load_model", "__version__"]
