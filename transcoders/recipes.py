"""Named training recipes: `transcoders train --recipe NAME` and `TrainConfig(recipe=NAME)`.

A recipe is a set of `TrainConfig` settings. Those it names replace the settings a run leaves at
their defaults; a flag given beside it (`--recipe large --tokens 500000`) wins. Where each recipe's
scores come from: BENCHMARKS.md (benchmarks/faithfulness.py and benchmarks/transcoder_kinds.py).

  default  the embedded default set of gemma-3-270m, trained on first use (`transcoders.default`;
           a few minutes on a 2-core CPU, within the first-use memory budget). Changing it means
           changing `transcoders.default.DEFAULT_NAME`, the cache key, too.
  clt      the default's budget and text spent on a cross-layer transcoder with a skip term.
  large    a wider skip set on more text: about an hour on a 2-core CPU, minutes on a GPU;
           resumable like every run.
"""

from __future__ import annotations

from gemma_lm.errors import UserError

_DEFAULT = {
    "kind": "skip",
    "activation": "batchtopk",
    "d_sae": 1024,
    "k": 16,
    "matryoshka": [128, 512],
    "text": "builtin",
    "context": 128,
    "tokens": 120 * 1024,
    # 512, not 1024: a step's temporaries then fit the first-use memory budget (4 GB peak RSS,
    # benchmarks/first_use.py), at some cost in speed per token
    "batch_size": 512,
    "buffer_tokens": 16384,
    "buffer_passes": 2,
    "harvest_dtype": "bfloat16",
    "lr": 2e-3,
    "checkpoint_every": 40,
    "seed": 0,
}

RECIPES: dict[str, dict] = {
    "default": _DEFAULT,
    "clt": {**_DEFAULT, "kind": "clt", "skip": True},
    "large": {
        **_DEFAULT,
        "d_sae": 4096,
        "k": 32,
        "matryoshka": [256, 1024],
        "tokens": 1024 * 1024,
        "batch_size": 1024,
        "buffer_tokens": 32768,
        "buffer_passes": 1,
        "lr": 1e-3,
        "checkpoint_every": 50,
    },
}


def recipe_settings(name: str) -> dict:
    """The settings of recipe `name` (a copy: callers may change it)."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    return {key: list(v) if isinstance(v, list) else v for key, v in RECIPES[name].items()}
