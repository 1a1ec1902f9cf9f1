"""The embedded default transcoder set for gemma-3-270m: trained on first use, then cached.

`load_default_transcoders(lm)` returns the set from `default_transcoders_dir()` (under
`gemma_lm.files.cache_dir()/transcoders/`), training it there first if it is missing: `default_recipe()`
on the offline builtin text (English speeches and Python documentation), a few minutes on a 2-core CPU,
with a progress bar, resumable if killed (rerun and it continues from its last checkpoint). A lock file
keeps two processes from training it at once. `resolve_transcoders(spec, lm)` turns what a user names
("default", a path, or a set) into a set checked against the model.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import cache_dir
from gemma_lm.models import DEFAULT_MODEL, LoadedModel

from .formats import load_any, load_native
from .model import TranscoderSet
from .train import TrainConfig, train_transcoders

# The name is the cache key: change it whenever the recipe changes, so stale sets are not reused.
DEFAULT_NAME = "gemma-3-270m-skip-batchtopk1024-v4"


def default_transcoders_dir() -> Path:
    """Where the default set lives (a native directory; its config.json means it is trained)."""
    return cache_dir() / "transcoders" / DEFAULT_NAME


def default_recipe(out: str | Path | None = None, progress: bool = True) -> TrainConfig:
    """The training run behind the default set (see docs/transcoders.md for why these choices)."""
    return TrainConfig(
        out=str(out or default_transcoders_dir()),
        model=DEFAULT_MODEL,
        kind="skip",
        activation="batchtopk",
        d_sae=1024,
        k=16,
        matryoshka=[128, 512],
        text="builtin",
        context=128,
        tokens=120 * 1024,
        batch_size=1024,
        buffer_tokens=16384,
        buffer_passes=2,
        harvest_dtype="bfloat16",
        lr=2e-3,
        checkpoint_every=20,
        seed=0,
        progress=progress,
    )


def load_default_transcoders(lm, progress: bool = True):
    """The default transcoder set for the embedded gemma-3-270m `lm`, trained and cached on first use."""
    if lm.name != DEFAULT_MODEL:
        raise UserError(
            f"the default transcoders belong to {DEFAULT_MODEL}, not {lm.name}; pass "
            f"--transcoders PATH (or train some with `transcoders train --model {lm.name}`)"
        )
    out = default_transcoders_dir()
    if not (out / "config.json").exists():
        with _lock(out.parent / f".{out.name}.lock"):
            if not (out / "config.json").exists():  # another process may have finished it meanwhile
                print(
                    f"gemma-circuits: training the default transcoders for {DEFAULT_MODEL} (first use only, "
                    f"a few minutes; cached in {out})",
                    file=sys.stderr,
                )
                train_transcoders(default_recipe(out, progress), loaded=lm)
    return load_native(out, model=lm)


def resolve_transcoders(spec, lm: LoadedModel, progress: bool = True) -> TranscoderSet:
    """A TranscoderSet from "default" (or None, or ""), a path in any supported layout, or an existing
    set; checked against the model."""
    if isinstance(spec, TranscoderSet):
        tc = spec
    elif spec in (None, "", "default"):
        if lm.name != DEFAULT_MODEL:
            raise UserError(
                f"there is no default transcoder set for {lm.name}; pass --transcoders PATH"
            )
        tc = load_default_transcoders(lm, progress=progress)
    else:
        tc = load_any(str(spec), model=lm)
    tc.check_compatible(lm.sites, lm.name)
    return tc


class _lock:
    """An exclusive advisory lock on a file (released when the process dies, so never stale)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
