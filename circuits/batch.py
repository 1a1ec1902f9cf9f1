"""Batch tracing: one attribution graph per prompt of a JSONL file, split across the ranks of a
torchrun job. In one process, or in four:

    circuits trace-batch prompts.jsonl --out runs/study
    torchrun --nproc-per-node 4 -m circuits trace-batch prompts.jsonl --out runs/study

The prompts file holds one JSON object a line: {"prompt": ..., "target": " Paris" (optional; a
string or a list of strings), "contrast": " London" (optional), "id": "paris" (optional; default:
the line number)}; other keys are kept in the index as they are.

The output folder:
  batch.json              the job's options; a resumed run must use the same ones (or --overwrite)
  graphs/ID.npz           one graph per prompt (`AttributionGraph.save`, written atomically); its
                          metadata["batch"] holds the index record and `scores` the scores
  progress/rank-R.jsonl   this run's records, one log per rank (live progress, failures)
  index.jsonl             one record per prompt in file order, written atomically by rank 0 at the
                          end and rebuilt from the graph files themselves: every prompt appears
                          exactly once, whatever was killed when

Resuming: a prompt is skipped when its graph exists, loads, and was traced for the same prompt,
targets and contrast; the rest are dealt round-robin across the ranks, so a resumed job may use
another number of ranks.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text, check_output_dir, write_failure_as_user_error
from gemma_lm.jobs import option, with_overrides
from gemma_lm.models import check_text, load_model
from gemma_lm.ranks import DistBackend, Ranks
from transcoders.dashboards import dashboards_for
from transcoders.default import resolve_transcoders

from .attribution import AttributionConfig, attribute, single_token
from .graph import FEATURE, AttributionGraph, attach_dashboards, load_graph
from .pruning import graph_scores

# options that change how a graph is computed but not what it is: a resumed run may change them
_NON_RESULT_OPTIONS = {
    "progress",
    "targets",
    "contrast",
    "device",
    "batch_size",
    "memory_gb",
    "max_tokens",
}
_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


@dataclass
class BatchConfig:
    """Trace one attribution graph per prompt of PROMPTS.jsonl into DIR/graphs, with an index
    (DIR/index.jsonl) and a summary table. Launch with `torchrun --nproc-per-node N -m circuits
    trace-batch ...` to split the prompts across N processes (gloo on the CPU, nccl with --device
    cuda). Rerun the same command to resume. (`circuits.batch.trace_batch` takes these options as
    keywords.)"""

    prompts: str | list = option(default="", positional=True, metavar="PROMPTS.jsonl")
    """one JSON object a line: {"prompt": ..., "target": ..., "contrast": ..., "id": ...} (only
    prompt is required); from Python also a list of such dicts or of prompt strings"""
    out: str = option(default="batch", metavar="DIR")
    """output folder (created; reused to resume)"""
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    scores: bool = True
    """store replacement / completeness scores in each graph"""
    overwrite: bool = False
    """retrace prompts whose graph exists already"""
    dist_backend: DistBackend = "auto"
    """torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on the CPU)"""
    timeout_min: float = 120.0
    """how long a rank waits for the others (model loading, the final merge), in minutes"""

    def check(self) -> None:
        if isinstance(self.prompts, str) and not self.prompts:
            raise UserError(
                "no prompts: give a prompts file (PROMPTS.jsonl), one JSON object a line"
            )
        if self.attribution.targets or self.attribution.contrast:
            raise UserError(
                '--target / --contrast are per prompt in a batch: put "target" / "contrast" on '
                "the prompt's line of the prompts file"
            )
        check_output_dir(self.out, "--out")


@dataclass
class PromptSpec:
    id: str
    prompt: str
    targets: list[str]
    contrast: str | None
    line: int  # 1-based line in the prompts file
    extra: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.id}.npz"

    def as_record(self) -> dict:
        target = self.targets[0] if len(self.targets) == 1 else (self.targets or None)
        return {
            "id": self.id,
            "prompt": self.prompt,
            "target": target,
            "contrast": self.contrast,
            **self.extra,
        }


@dataclass
class BatchResult:
    """What a batch run did. `records`: the index, one dict per prompt in file order."""

    records: list[dict]
    index_path: Path
    n_traced: int  # by this run, on all ranks
    n_skipped: int  # done by an earlier run
    n_failed: int
    seconds: float
    rank: int = 0  # of the process that returns this

    def table(self, max_prompt: int = 40) -> str:
        """The index as a markdown table."""
        rows = [
            "| id | prompt | top logit | p | nodes | edges | replacement | s | status |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.records:
            prompt = (
                r["prompt"]
                if len(r["prompt"]) <= max_prompt
                else r["prompt"][: max_prompt - 1] + "…"
            )
            cells = [
                r["id"],
                repr(prompt),
                repr(r["top_logit"]) if r.get("top_logit") is not None else "-",
                _fmt(r.get("top_logit_prob"), ".3f"),
                _fmt(r.get("n_nodes"), "d"),
                _fmt(r.get("n_edges"), "d"),
                _fmt(r.get("replacement"), ".3f"),
                _fmt(r.get("seconds"), ".1f"),
                r["status"] if r["status"] != "failed" else f"failed: {r.get('error', '')}",
            ]
            rows.append(
                "| "
                + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
                + " |"
            )
        return "\n".join(rows)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# -- prompts ---------------------------------------------------------------------------------------


def read_prompts(source: str | Path | list) -> list[PromptSpec]:
    """Prompt specs from a JSONL file (or a list of dicts / strings), checked: every line an object
    with a "prompt" string, ids unique and usable as file names."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not str(source) or not path.is_file():
            raise UserError(
                f"prompts file {source!r} does not exist; give a JSONL file with one "
                f'{{"prompt": ...}} object a line'
            )
        items = []
        # bytes that are not UTF-8 become lone surrogates: that prompt fails, not the whole file
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path} line {n} is not JSON ({e.msg}); write one JSON object a line"
                ) from None
        where = str(path)
    else:
        items, where = [(n, item) for n, item in enumerate(source, start=1)], "prompt list"
    specs, seen = [], {}
    for n, item in items:
        if isinstance(item, str):
            item = {"prompt": item}
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prompt"), str)
            or not item["prompt"]
        ):
            raise UserError(
                f'{where} line {n}: expected an object with a non-empty "prompt" string, '
                f"got {item!r:.80}"
            )
        target = item.get("target")
        targets = (
            [target] if isinstance(target, str) else target if isinstance(target, list) else []
        )
        if target is not None and not (targets and all(isinstance(t, str) for t in targets)):
            raise UserError(f'{where} line {n}: "target" must be a string or a list of strings')
        contrast = item.get("contrast")
        if contrast is not None and (not isinstance(contrast, str) or len(targets) != 1):
            raise UserError(
                f'{where} line {n}: "contrast" must be a string and needs exactly one "target"'
            )
        pid = str(item["id"]) if item.get("id") is not None else f"{n:05d}"
        if not _ID_PATTERN.match(pid):
            raise UserError(
                f"{where} line {n}: id {pid!r} cannot name a file; "
                'use letters, digits, ".", "_", "-"'
            )
        if pid in seen:
            raise UserError(
                f"{where} line {n}: id {pid!r} is used already on line {seen[pid]}; "
                "ids must be unique"
            )
        seen[pid] = n
        extra = {k: v for k, v in item.items() if k not in ("prompt", "target", "contrast", "id")}
        specs.append(PromptSpec(pid, item["prompt"], targets, contrast, n, extra))
    if not specs:
        raise UserError(f"{where} holds no prompts")
    return specs


def check_prompts(lm, specs: list[PromptSpec], cfg: AttributionConfig) -> None:
    """Refuse the whole job up front when a prompt is too long or a target is not one token, rather
    than hours into it. A prompt that is not valid text fails alone, when its turn comes."""
    for s in specs:
        try:
            check_text(s.prompt)
        except UserError:
            continue
        try:
            n_tokens = len(lm.tokenize(s.prompt, chat=cfg.chat))
            if n_tokens > cfg.max_tokens:
                raise UserError(
                    f"the prompt is {n_tokens} tokens, more than --max-tokens {cfg.max_tokens}"
                )
            for t in s.targets + ([s.contrast] if s.contrast else []):
                check_text(t, f"target {t!r}")
                single_token(lm, t)
        except UserError as e:
            raise UserError(f"prompt {s.id!r} (line {s.line}): {e}") from None


# -- the output folder -----------------------------------------------------------------------------


def _job_options(cfg: AttributionConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _NON_RESULT_OPTIONS}


def prepare_folder(out: Path, cfg: BatchConfig) -> None:
    """(Rank 0, before any rank writes.) Check or record the job's options; drop what a killed run
    left."""
    options = _job_options(cfg.attribution)
    job = out / "batch.json"
    if job.exists() and not cfg.overwrite:
        try:
            old = json.loads(job.read_text()).get("attribution", {})
        except json.JSONDecodeError:
            old = {}
        diff = {k: (old.get(k), v) for k, v in options.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise UserError(
                f"{out} holds graphs traced with other options ({what}); pass the same options to "
                f"resume, another --out, or --overwrite to retrace everything"
            )
    with write_failure_as_user_error(job):
        atomic_write_text(
            job, json.dumps({"format": "gemma-circuits-batch", "attribution": options}, indent=1)
        )
        (out / "graphs").mkdir(parents=True, exist_ok=True)
    # temporary files of writes that a kill interrupted
    for stale in (out / "graphs").glob(".*.partial"):
        stale.unlink(missing_ok=True)
    progress = out / "progress"
    progress.mkdir(exist_ok=True)
    for old_log in progress.glob("rank-*.jsonl"):
        old_log.unlink()


def graph_is_done(path: Path, spec: PromptSpec) -> bool:
    """The graph exists, loads, and was traced for this prompt, targets and contrast."""
    if not path.exists():
        return False
    try:
        g = load_graph(path)
    except UserError:
        return False
    settings = g.settings
    return (
        g.prompt == spec.prompt
        and list(settings.get("targets") or []) == spec.targets
        and settings.get("contrast") == spec.contrast
    )


def read_header(path: Path) -> dict:
    """The JSON header of a graph file, without reading its arrays."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z["header"].tobytes().decode())


def graph_record(
    spec: PromptSpec, graph: AttributionGraph, seconds: float | None, rank: int | None
) -> dict:
    scores = graph.scores.get("full") or {}
    strings = graph.logit_strings
    return {
        **spec.as_record(),
        "status": "ok",
        "file": f"graphs/{spec.filename}",
        "top_logit": strings[0] if strings else None,
        "top_logit_prob": float(graph.logit_probabilities[0])
        if len(graph.logit_probabilities)
        else None,
        "top_prediction": (graph.metadata.get("top_predictions") or [[None]])[0][0],
        "n_nodes": int(graph.n_nodes),
        "n_features": int((graph.kind == FEATURE).sum()),
        "n_edges": int(graph.adjacency.nnz),
        "replacement": scores.get("replacement"),
        "completeness": scores.get("completeness"),
        "seconds": None if seconds is None else round(seconds, 3),
        "rank": rank,
    }


def _append_line(path: Path, record: dict) -> None:
    """One line appended and synced: a kill can cut at most the last line, which readers skip."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_log(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def build_index(out: Path, specs: list[PromptSpec]) -> list[dict]:
    """(Rank 0, after every rank finished.) One record per prompt from the graph files, failures
    from the rank logs; written atomically to index.jsonl."""
    failures = {}
    for log in sorted((out / "progress").glob("rank-*.jsonl")):
        for r in _read_log(log):
            if r.get("status") == "failed":
                failures[r["id"]] = r
    records = []
    for s in specs:
        path = out / "graphs" / s.filename
        record = None
        if path.exists():
            try:
                record = read_header(path)["metadata"].get("batch")
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error):
                record = None  # a damaged graph file: graph_is_done below decides
            # a graph this job did not write, but the right one
            if record is None and graph_is_done(path, s):
                record = graph_record(s, load_graph(path), None, None)
        if record is None or any(
            record.get(k) != s.as_record()[k] for k in ("prompt", "target", "contrast")
        ):
            record = failures.get(s.id) or {**s.as_record(), "status": "missing"}
        records.append({**record, **s.as_record()})  # ids and extra keys as in today's prompts file
    with write_failure_as_user_error(out / "index.jsonl"):
        atomic_write_text(out / "index.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records


# -- the job ---------------------------------------------------------------------------------------


def trace_batch(
    config: BatchConfig | None = None, lm=None, transcoders=None, **overrides
) -> BatchResult:
    """Trace every prompt of `config.prompts` into `config.out`; see the module docstring.

    Under torchrun, every rank calls this and traces its share; every rank returns the full index.
    `lm` / `transcoders`: an already loaded model / TranscoderSet (else loaded from the config)."""
    cfg = with_overrides(config, BatchConfig, overrides)
    ranks = Ranks.start(cfg.dist_backend, cfg.attribution.device, cfg.timeout_min)
    try:
        return _run(cfg, ranks, lm, transcoders)
    finally:
        ranks.finish()


def _model_and_transcoders(
    cfg: BatchConfig, ranks: Ranks, acfg: AttributionConfig, specs, out: Path, lm, transcoders
):
    """(lm, tc, their feature dashboards or None) on every rank. Rank 0 checks the folder before
    anyone works; every rank loads the model at once; rank 0 resolves the transcoders and their
    dashboards first (the default set is trained on first use, and missing dashboards are built:
    once, not once per rank), then the others."""
    _everywhere(ranks, lambda: prepare_folder(out, cfg), here=ranks.is_main)
    if lm is None:
        lm = _everywhere(
            ranks, lambda: load_model(acfg.model, device=acfg.device, dtype=acfg.dtype)
        )
    tc_spec = transcoders if transcoders is not None else acfg.transcoders

    def resolve(progress: bool):
        tc = resolve_transcoders(tc_spec, lm, progress)
        if ranks.is_main:
            check_prompts(lm, specs, acfg)
        return tc, dashboards_for(tc_spec, lm, tc, progress) if acfg.dashboards else None

    found = _everywhere(ranks, lambda: resolve(cfg.attribution.progress), here=ranks.is_main)
    found_later = _everywhere(ranks, lambda: resolve(False), here=not ranks.is_main)
    return (lm, *(found if ranks.is_main else found_later))


@dataclass
class _Work:
    """The prompts an earlier run finished (`done`, ids), those left (`todo`, on all ranks) and this
    rank's share of them (`mine`)."""

    done: set[str]
    todo: list[PromptSpec]
    mine: list[PromptSpec]


def _share_work(cfg: BatchConfig, ranks: Ranks, specs: list[PromptSpec], out: Path) -> _Work:
    # each rank checks a share of the graph files
    share = specs[ranks.rank :: ranks.world_size]
    done_here = (
        []
        if cfg.overwrite
        else [s.id for s in share if graph_is_done(out / "graphs" / s.filename, s)]
    )
    done = {i for ids in ranks.all_gather_object(done_here) for i in ids}
    todo = [s for s in specs if s.id not in done]
    work = _Work(done, todo, todo[ranks.rank :: ranks.world_size])
    if ranks.is_main and cfg.attribution.progress:
        print(
            f"{len(specs)} prompts: {len(done)} done already, {len(todo)} to trace on "
            f"{ranks.world_size} rank{'s' if ranks.world_size > 1 else ''}",
            file=sys.stderr,
            flush=True,
        )
    return work


def _trace_one(
    spec: PromptSpec,
    lm,
    tc,
    dashboards,
    acfg: AttributionConfig,
    with_scores: bool,
    out: Path,
    rank: int,
) -> dict:
    """Trace one prompt into graphs/ID.npz (with `dashboards` of its features, unless None); its
    index record, or the record of its failure."""
    t = time.perf_counter()
    try:
        graph = attribute(
            lm,
            spec.prompt,
            transcoders=tc,
            config=replace(acfg, targets=list(spec.targets), contrast=spec.contrast),
        )
        if dashboards is not None:
            attach_dashboards(graph, dashboards)
        if with_scores:
            scores = _scores(graph)
            if scores is not None:
                graph.scores = {"full": scores}
        record = graph_record(spec, graph, time.perf_counter() - t, rank)
        graph.metadata["batch"] = record
        graph.save(out / "graphs" / spec.filename)
        return record
    except Exception as e:  # one bad prompt must not end a job of thousands; reported, retried
        if not isinstance(e, UserError):
            traceback.print_exc()
        return {
            **spec.as_record(),
            "status": "failed",
            "error": f"{e.__class__.__name__}: {e}",
            "rank": rank,
        }


def _trace_share(
    cfg: BatchConfig,
    ranks: Ranks,
    mine: list[PromptSpec],
    lm,
    tc,
    dashboards,
    acfg: AttributionConfig,
    out,
) -> int:
    """Trace this rank's prompts, each record appended to progress/rank-R.jsonl as it comes.
    Returns how many failed."""
    log = out / "progress" / f"rank-{ranks.rank}.jsonl"
    bar = None
    if cfg.attribution.progress:
        from tqdm.auto import tqdm

        desc = f"rank {ranks.rank}" if ranks.distributed else "trace-batch"
        bar = tqdm(
            total=len(mine), desc=desc, unit="prompt", position=ranks.rank, dynamic_ncols=True
        )
    n_failed = 0
    for spec in mine:
        record = _trace_one(spec, lm, tc, dashboards, acfg, cfg.scores, out, ranks.rank)
        if record["status"] == "failed":
            n_failed += 1
        _append_line(log, record)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return n_failed


def _run(cfg: BatchConfig, ranks: Ranks, lm, transcoders) -> BatchResult:
    t0 = time.perf_counter()
    acfg = replace(cfg.attribution, progress=False, device=ranks.device_for(cfg.attribution.device))
    specs = read_prompts(cfg.prompts)
    out = Path(cfg.out).expanduser()
    lm, tc, dashboards = _model_and_transcoders(cfg, ranks, acfg, specs, out, lm, transcoders)
    work = _share_work(cfg, ranks, specs, out)
    n_failed = _trace_share(cfg, ranks, work.mine, lm, tc, dashboards, acfg, out)

    ranks.barrier()
    records = build_index(out, specs) if ranks.is_main else None
    records = ranks.broadcast_object(records)
    n_failed = sum(ranks.all_gather_object(n_failed))
    return BatchResult(
        records,
        out / "index.jsonl",
        n_traced=len(work.todo) - n_failed,
        n_skipped=len(work.done),
        n_failed=n_failed,
        seconds=time.perf_counter() - t0,
        rank=ranks.rank,
    )


def _everywhere(ranks: Ranks, fn, here: bool = True):
    """fn() on this rank when `here`; a UserError raised on any rank is raised on every rank, so
    none is left waiting in a collective for a rank that gave up."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    ranks.agree(error)
    return result


def _scores(graph: AttributionGraph) -> dict | None:
    """Replacement / completeness scores."""
    return graph_scores(graph)
