"""The embedded default transcoder set for gemma-3-270m: trained on first use, then cached.

`load_default_transcoders(lm)` returns the set from `default_transcoders_dir()` (under
`gemma_lm.files.cache_dir()/transcoders/`), training it there first if it is missing:
`default_recipe()` on the offline builtin text (English speeches and Python documentation), with a
progress bar (benchmarks/transcoders_default.py times the training), resumable if killed (rerun and
it continues from its last checkpoint), and then its feature dashboards. A lock file keeps two
processes from training it at once.
`resolve_transcoders(spec, lm)` turns what a user names ("default", a path, or a set) into a set
checked against the model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gemma_lm.errors import UserError
from gemma_lm.files import cache_dir, exclusive_lock
from gemma_lm.jobs import to_argv
from gemma_lm.models import DEFAULT_MODEL, LoadedModel

from .formats import load_any, load_native
from .model import TranscoderSet
from .train import TrainConfig

# The name is the cache key: change it whenever the recipe ("default" in transcoders.recipes) or
# the training code changes what it trains, so stale sets are not reused.
DEFAULT_NAME = "gemma-3-270m-skip-batchtopk1024-v5"


def default_transcoders_dir() -> Path:
    """Where the default set lives (a native directory; its config.json means it is trained)."""
    return cache_dir() / "transcoders" / DEFAULT_NAME


def default_recipe(out: str | Path | None = None, progress: bool = True) -> TrainConfig:
    """The training run behind the default set (recipe "default" of `transcoders.recipes`; see
    docs/transcoder_training.md for why these choices), written to `out` (None: the default set's
    own folder; "": nowhere)."""
    return TrainConfig(
        recipe="default",
        out=str(default_transcoders_dir() if out is None else out),
        model=DEFAULT_MODEL,
        progress=progress,
    )


def load_default_transcoders(lm, progress: bool = True):
    """The default transcoder set for the embedded gemma-3-270m `lm`, trained and cached on first
    use."""
    if lm.name != DEFAULT_MODEL:
        raise UserError(
            f"the default transcoders belong to {DEFAULT_MODEL}, not {lm.name}; pass "
            f"--transcoders PATH (or train some with `transcoders train --model {lm.name}`)"
        )
    out = default_transcoders_dir()
    if not (out / "config.json").exists():
        with exclusive_lock(out.parent / f".{out.name}.lock"):
            if not (out / "config.json").exists():  # another process may have finished it meanwhile
                print(
                    f"gemma-circuits: training the default transcoders for {DEFAULT_MODEL} (first "
                    f"use only, a few minutes; cached in {out})",
                    file=sys.stderr,
                )
                _train_in_a_process_of_its_own(default_recipe(out, progress))
                _build_dashboards_in_a_process_of_its_own(out, progress)
    return load_native(out, model=lm)


def _build_dashboards_in_a_process_of_its_own(out: Path, progress: bool) -> None:
    """Build the new set's feature dashboards (`transcoders dashboards`, default settings) into
    `out/dashboards`, as part of its first use, so that every trace shows what its features mean.
    A failure here is reported, not fatal: the first trace builds them again."""
    flag = "--progress" if progress else "--no-progress"
    status = _run_transcoders_command(["dashboards", "--transcoders", str(out), flag])
    if status != 0:
        print(
            f"gemma-circuits: building the default set's dashboards stopped (exit status "
            f"{status}); the first trace tries again",
            file=sys.stderr,
        )


def _run_transcoders_command(args: list[str]) -> int:
    """`transcoders ARGS` in a process of its own; its exit status. Its closing summary goes with
    its progress bars, to stderr: stdout is the caller's."""
    done = subprocess.run(
        [sys.executable, "-m", "transcoders", *args], stdout=subprocess.PIPE, text=True
    )
    print(done.stdout, end="", file=sys.stderr)
    return done.returncode


def _train_in_a_process_of_its_own(recipe: TrainConfig) -> None:
    """Run `recipe` as `transcoders train`, in a process of its own: there it may tune the allocator
    for training (`gemma_lm.memory`), and all it held goes back to the system when it ends, before
    the caller goes on to trace. Its progress and messages go to this process's terminal; killed, it
    resumes from its checkpoint the next time."""
    status = _run_transcoders_command(["train", *to_argv(recipe)])
    if status != 0:
        raise UserError(
            f"training the default transcoders stopped (exit status {status}); the messages above "
            f"say why. Run again to resume from its checkpoint in {recipe.out}.train"
        )


def resolve_transcoders(spec, lm: LoadedModel, progress: bool = True) -> TranscoderSet:
    """A TranscoderSet from "default" (or None, or ""), a path in any supported layout, or an
    existing set; checked against the model."""
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
