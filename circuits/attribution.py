"""Attribution graphs of one prompt (Ameisen et al., 2025, "Circuit Tracing").

Nodes: active transcoder features, error nodes (layer, position), token embeddings, logits.
Edge s -> t: the direct linear effect of source s on target t's input in the frozen local
replacement model (`replacement.py`): activation x decoder vectors (summed over every layer a CLT
feature writes to) dotted with the gradient of the target. Targets go through the transposed model
in batches; each batch's edges are contracted layer by layer as its gradient passes, so no batch
ever holds more than its rows x the sources plus one layer's gradient. Feature rows are computed in
order of their estimated influence on the logits, up to a budget; when the budget covers every
active feature, batches are grouped by position instead so that each one's backward pass stays
short.

`attribute` runs the stages at the end of this file, in order: the model and transcoders, a check
that the trace fits in memory, their feature dashboards, the frozen prompt, its active features and
error vectors, the node table, the row schedule, the edge rows, the graph (with the dashboards of
its features attached).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from gemma_lm import __version__
from gemma_lm.errors import UserError
from gemma_lm.jobs import option, with_overrides
from gemma_lm.memory import return_freed_memory
from gemma_lm.models import DEFAULT_MODEL, LoadedModel, load_model
from transcoders.dashboards import dashboards_for, transcoder_identity
from transcoders.default import resolve_transcoders
from transcoders.model import TranscoderSet

from .backend import PositionSortedFeatures, abs_rmatvec, active_backend, to_device
from .graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph, attach_dashboards
from .replacement import (
    FrozenWeights,
    PromptState,
    TransposedModel,
    active_decoder_rows,
    active_encoder_rows,
    check_prompt,
    decode_sparse,
    frozen_forward,
    run_and_freeze,
)


@dataclass
class AttributionConfig:
    """Attribution: which model, transcoders, logits and budget (`circuits.attribute` takes these as
    keywords)."""

    model: str = DEFAULT_MODEL
    """gemma-3-270m (the embedded default), a .gguf file, a Hugging Face directory or Hub id"""
    transcoders: str = "default"
    """'default' (the embedded set for gemma-3-270m) or a directory in the native, Gemma Scope 2 or
    circuit-tracer layout"""
    max_feature_nodes: int = 8192
    """compute the incoming edges of at most this many features, most influential first"""
    batch_size: int = 256
    """targets per transposed pass"""
    max_n_logits: int = 10
    """at most this many logit nodes"""
    desired_logit_prob: float = 0.95
    """logit nodes: the most probable tokens until their probabilities sum to this"""
    targets: list[str] = option(default_factory=list, flag="--target", metavar="TOKEN")
    """attribute this token instead of the top predictions (repeatable; one token each, mind the
    leading space: ' Paris')"""
    contrast: str | None = None
    """attribute logit(target) - logit(CONTRAST)"""
    chat: bool = False
    """wrap the prompt in the model's chat template"""
    device: str = "cpu"
    """cpu, cuda or cuda:N"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """float32 (exact) or bfloat16 (the model's forward pass; attribution runs in float32)"""
    max_tokens: int = 4096
    """refuse prompts longer than this many tokens"""
    memory_gb: float = 1.0
    """bound on the working memory of one batch (its rows x sources, and its gradients)"""
    dashboards: bool = True
    """attach each feature's dashboard (top contexts, promoted tokens, label); a transcoder set
    without dashboards gets them built once, before its first trace (--no-dashboards: neither)"""
    bos_features: bool = False
    """keep feature nodes at the <bos> position (by default its MLP outputs are error nodes:
    position 0 is the same attention sink for every prompt)"""
    progress: bool = True
    """show progress bars"""

    def check(self) -> None:
        if self.max_feature_nodes < 0:
            raise UserError("--max-feature-nodes must be >= 0")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        if self.max_n_logits < 1:
            raise UserError("--max-n-logits must be >= 1")
        if not 0.0 < self.desired_logit_prob <= 1.0:
            raise UserError("--desired-logit-prob must be in (0, 1]")
        if self.memory_gb <= 0:
            raise UserError("--memory-gb must be > 0")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                f"--device {self.device}, but torch sees no CUDA device here; use --device cpu"
            )


# -- transcoders and logit targets -----------------------------------------------------------------


def single_token(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise UserError(
            f"target {text!r} is {len(ids)} tokens {pieces}, not one; pick a single-token target "
            f"(mind the leading space, e.g. ' Paris')"
        )
    return int(ids[0])


def choose_logits(lm: LoadedModel, logits: torch.Tensor, cfg: AttributionConfig):
    """(token ids, probabilities, strings, contrast id) of the logit nodes: the named targets, or
    the most probable tokens until their cumulative probability reaches `desired_logit_prob` (at
    most `max_n_logits`)."""
    probs = torch.softmax(logits.float().cpu(), -1)
    if cfg.targets:
        ids = [single_token(lm, t) for t in cfg.targets]
        if len(set(ids)) != len(ids):
            raise UserError("the same --target was given twice; name each token once")
    else:
        if cfg.contrast:
            raise UserError(
                "--contrast needs a --target (the logit difference is target minus contrast)"
            )
        top = probs.topk(min(cfg.max_n_logits, len(probs)))
        k = int((top.values.cumsum(0) < cfg.desired_logit_prob).sum()) + 1
        ids = top.indices[: min(k, cfg.max_n_logits)].tolist()
    contrast = None
    if cfg.contrast:
        if len(ids) != 1:
            raise UserError("--contrast takes exactly one --target")
        contrast = single_token(lm, cfg.contrast)
        if contrast == ids[0]:
            raise UserError("--contrast is the same token as --target; their difference is zero")
    strings = [lm.tokenizer.decode([i]) for i in ids]
    if contrast is not None:
        strings = [f"{strings[0]} - {lm.tokenizer.decode([contrast])}"]
    return ids, probs[ids].numpy().astype(np.float32), strings, contrast


# -- edges from every source to a batch of targets -------------------------------------------------


class SourceEdges:
    """Edge rows `[B, n_src]` for batches of targets. Sources, in node order: active features
    (sorted by layer, position, feature), error nodes (layer-major), token embeddings.

    Feature edges use the compiled kernel when one is active (one
    `circuits.backend.PositionSortedFeatures` per source layer, made once per prompt); otherwise
    each position's features are contracted with one batched matrix product (the features of a
    layer are padded per position to `[n_pos, c_max]` slots), which reads each decoder row once per
    batch."""

    def __init__(
        self,
        state: PromptState,
        tc,
        f_layer,
        f_pos,
        f_act,
        decoders,
        errors: torch.Tensor,
        backend: str,
        cache_bytes: int = 512 << 20,
    ):
        self.tc, self.state, self.errors, self.backend = tc, state, errors, backend
        L, n = tc.n_layers, state.n_pos
        self.n, self.n_feat = n, len(f_layer)
        self.err0 = self.n_feat
        self.tok0 = self.n_feat + L * n
        self.n_src = self.tok0 + n
        dev = state.resid.device
        self.b_dec = torch.stack([tc.b_dec[l].detach().float() for l in range(L)]).to(dev)  # [L, D]
        # per source layer: (its first column, its features for the kernel or per-position slots)
        self.layers = []
        # the decoder rows of each layer's active features (`replacement.active_decoder_rows`, read
        # once): `[n_unique, n_out, D]`; each feature is the index of its row there
        self.decoders = [rows.to(dev) for rows, _ in decoders]
        starts = np.searchsorted(f_layer.numpy(), np.arange(L + 1))
        for s in range(L):
            a, b = int(starts[s]), int(starts[s + 1])
            pos, act, feat = f_pos[a:b], f_act[a:b].float(), decoders[s][1].cpu()
            if backend in ("cpp", "cuda"):
                self.layers.append(
                    (a, PositionSortedFeatures(pos, feat, act, len(self.decoders[s]), dev, backend))
                )
            else:
                self.layers.append((a, self._slots(pos, feat, act, n, dev)))
        self._cache: dict = {}
        self._cache_left = cache_bytes

    @staticmethod
    def _slots(pos, feat, act, n, dev):
        """Per-position padding of one layer's features: feature ids, activations (0 in padding)
        and which slots are real, each `[n, c_max]`. Features are sorted by position, so the real
        slots of positions < P, read row by row, are the layer's first features in order."""
        counts = torch.bincount(pos, minlength=n)
        c_max = int(counts.max()) if len(pos) else 0
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(pos)) - first[pos]
        ids = torch.zeros(n, c_max, dtype=torch.long)
        acts = torch.zeros(n, c_max)
        valid = torch.zeros(n, c_max, dtype=torch.bool)
        ids[pos, slot], acts[pos, slot], valid[pos, slot] = feat, act, True
        return ids.to(dev), acts.to(dev), valid.to(dev)

    def _scaled_decoder(self, s: int, o: int) -> torch.Tensor:
        """Activation-scaled decoder rows of layer s's features into output layer s + o,
        `[n, c_max, D]`."""
        key = (s, o)
        if key in self._cache:
            return self._cache[key]
        ids, acts, _ = self.layers[s][1]
        dec = self.decoders[s][:, o]  # [n_unique, D], a view
        rows = dec.index_select(0, ids.flatten()).float().view(*ids.shape, -1) * acts[..., None]
        size = rows.numel() * 4
        # PLT decoders are small enough to keep; CLT ones are re-gathered
        if size <= self._cache_left:
            self._cache[key], self._cache_left = rows, self._cache_left - size
        return rows

    def _feature_edges(self, s: int, o: int, g: torch.Tensor, P: int) -> tuple[int, torch.Tensor]:
        """(first column, edges `[k, m]`) from layer s's features at positions < P into output
        layer s + o; g `[P, k, D]`."""
        col0, features = self.layers[s]
        if isinstance(features, PositionSortedFeatures):
            grad = g.permute(1, 0, 2)[:, None]  # [k, 1, P, D]
            return col0, features.edges(grad, self.decoders[s][:, o : o + 1], P)
        valid = features[2]
        if valid.shape[1] == 0:  # no features in this layer
            return col0, g.new_zeros(g.shape[1], 0)
        per_pos = torch.bmm(g, self._scaled_decoder(s, o)[:P].transpose(1, 2))  # [P, k, c_max]
        return col0, per_pos.transpose(0, 1)[:, valid[:P]]

    @torch.no_grad()
    def rows(
        self, engine: TransposedModel, layer: torch.Tensor, pos: torch.Tensor, vectors: torch.Tensor
    ):
        """Edge rows `[B, n_src]` (float32, on the model's device) and constant terms `[B]` (decoder
        biases) of B targets sorted by layer, descending."""
        B, n = len(layer), self.n
        out = torch.zeros(B, self.n_src, device=vectors.device)
        const = torch.zeros(B, device=vectors.device)
        tc, st = self.tc, self.state

        def visit(l: int, g: torch.Tensor, k: int, P: int) -> None:
            if l < 0:
                embedded = torch.bmm(g, st.embeddings[:P, :, None])[..., 0]
                out[:k, self.tok0 : self.tok0 + P] = embedded.T
                return
            e0 = self.err0 + l * n
            # what a gradient at x_{l+1} reads from layer l's MLP output: each position's error,
            # and the decoder bias (the same vector at every position, so one product with the
            # gradient's sum)
            out[:k, e0 : e0 + P] = torch.bmm(g, self.errors[l, :P, :, None])[..., 0].T
            const[:k] += g.sum(0) @ self.b_dec[l]
            for s in tc.output_layers_into(l):
                col0, e = self._feature_edges(s, l - s, g, P)
                out[:k, col0 : col0 + e.shape[1]] += e

        engine.run(layer, pos, vectors, visit)
        return out, const


# -- computed rows, influence ordering and the final adjacency -------------------------------------


class RowStore:
    """Computed rows as CSR segments (one per target layer per batch), with their target node
    indices.

    With `background` (the default for rows on a GPU) each batch is compacted on a worker thread,
    and on a side CUDA stream, while the next batch's backward pass runs: the compaction's host work
    (copies, CSR blocks) would otherwise leave the GPU idle. At most one batch waits, so at most one
    extra batch of rows is held."""

    def __init__(self, n_nodes: int, n_src: int, background: bool = False):
        self.n_nodes, self.n_src = n_nodes, n_src
        # (target layer, targets, rows, |row| sums)
        self.segments: list[tuple[int, np.ndarray, sp.csr_array, np.ndarray]] = []
        self.row_constant = np.zeros(n_nodes, dtype=np.float32)
        self.has_row = np.zeros(n_nodes, dtype=bool)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rowstore") if background else None
        self._pending = self._side = None

    def add(
        self,
        targets: np.ndarray,
        target_layers: np.ndarray,
        rows: torch.Tensor,
        const: torch.Tensor,
    ) -> None:
        """Rows `[B, n_src]` of `targets`, sorted by target layer (descending). The rows are
        compacted where they are (on a GPU only the nonzero entries cross to the host)."""
        if len(targets) == 0:
            return
        if self._worker is None:
            self._add(targets, target_layers, rows, const)
            return
        self.wait()
        ready = None
        if rows.is_cuda:
            # the side stream starts when the rows are complete, not when the queue is empty
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(rows.device))
        self._pending = self._worker.submit(self._add, targets, target_layers, rows, const, ready)

    def wait(self) -> None:
        """Until the batch being compacted in the background is stored (its errors are raised
        here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        if self._worker is not None:
            try:
                self.wait()
            finally:
                self._worker.shutdown()
                self._worker = None

    def _add(self, targets, target_layers, rows, const, ready=None) -> None:
        if ready is not None:
            side = self._side = self._side or torch.cuda.Stream(rows.device)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                self._compact(targets, target_layers, rows, const)
            # before `rows` is released to the allocator of the stream that made it
            side.synchronize()
        else:
            self._compact(targets, target_layers, rows, const)

    def _compact(self, targets, target_layers, rows, const) -> None:
        counts, cols, vals, totals = [], [], [], []
        # rows per chunk: about 2^22 entries, so the index temporaries stay small at any row width
        step = max(1, (1 << 22) // max(1, rows.shape[1]))
        for r in range(0, rows.shape[0], step):
            chunk = rows[r : r + step]
            nonzero = chunk != 0  # NaN stays: a broken row must show, not vanish
            counts.append(nonzero.sum(1).cpu().numpy())
            totals.append(chunk.abs().sum(1, dtype=torch.float64).cpu().numpy())
            flat = nonzero.flatten().nonzero()[:, 0]  # row-major: columns ascend within each row
            cols.append((flat % chunk.shape[1]).to(torch.int32).cpu().numpy())
            vals.append(chunk.flatten()[flat].cpu().numpy())
        indptr = np.zeros(len(targets) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(counts), out=indptr[1:])
        # int32 indices and indptr where they fit: scipy would widen int32 indices to an int64
        # indptr's type
        index = np.int32 if indptr[-1] < 2**31 else np.int64
        block = sp.csr_array(
            (
                np.concatenate(vals),
                np.concatenate(cols).astype(index, copy=False),
                indptr.astype(index, copy=False),
            ),
            shape=tuple(rows.shape),
        )
        totals = np.concatenate(totals)
        cuts = np.flatnonzero(np.diff(target_layers)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(targets)]):
            self.segments.append((int(target_layers[a]), targets[a:b], block[a:b], totals[a:b]))
        self.row_constant[targets] = const.cpu().numpy()
        self.has_row[targets] = True

    def influence(self, logit_nodes: np.ndarray, logit_weights: np.ndarray) -> np.ndarray:
        """Influence `[n_nodes]` of every node on the logits through the rows computed so far: with
        A the |adjacency| normalised by each row's total, w (A + A^2 + ...), w the logit
        probabilities. Edges only run from lower to higher layers, so one pass over the rows from
        the top layer down sums the whole series."""
        self.wait()
        v = np.zeros(self.n_nodes)
        v[logit_nodes] = logit_weights / max(float(logit_weights.sum()), 1e-12)
        for _, targets, block, totals in sorted(self.segments, key=lambda seg: -seg[0]):
            w = v[targets]
            if w.any():
                abs_rmatvec(block, w / np.maximum(totals, 1e-30), v[: self.n_src])
        v[logit_nodes] = 0.0
        return v

    def adjacency(self) -> sp.csr_array:
        """`[n_nodes, n_nodes]` CSR, targets x sources (rows not computed are empty). Frees the
        segments."""
        self.close()
        counts = np.zeros(self.n_nodes, dtype=np.int64)
        for _, targets, block, _ in self.segments:
            counts[targets] = np.diff(block.indptr)
        total = int(counts.sum())
        # int32 where it fits: 4 bytes an edge less than int64
        index = np.int32 if max(total, self.n_nodes) < 2**31 else np.int64
        indptr = np.zeros(self.n_nodes + 1, dtype=index)
        np.cumsum(counts, out=indptr[1:])
        data = np.empty(total, dtype=np.float32)
        indices = np.empty(total, dtype=index)
        # one target layer at a time: its rows fill one stretch of node order (nodes are sorted by
        # layer), so only that stretch of the result is resident while its segments are still held;
        # freed and returned to the system after each layer, the result never lies in memory beside
        # a full copy of the rows
        by_layer: dict[int, list] = {}
        for segment in self.segments:
            by_layer.setdefault(segment[0], []).append(segment)
        self.segments = []
        for layer in sorted(by_layer):
            # row by row: each row's entries, one copy
            for _, targets, block, _ in by_layer.pop(layer):
                for t, a, b in zip(
                    indptr[targets].tolist(), block.indptr[:-1].tolist(), block.indptr[1:].tolist()
                ):
                    data[t : t + b - a] = block.data[a:b]
                    indices[t : t + b - a] = block.indices[a:b]
            del targets, block
            return_freed_memory()
        return sp.csr_array((data, indices, indptr), shape=(self.n_nodes, self.n_nodes))


INFLUENCE_BATCHES = 4  # batches computed between two influence estimates


def _feature_batches_by_position(f_pos: np.ndarray, size: int) -> list[np.ndarray]:
    """Indices into `f_pos` `[k]`, in batches of features at one position or a few neighbouring
    ones: a batch's backward pass covers the positions up to its last one, so a batch that is at
    least half full is closed at the next position."""
    order = np.argsort(f_pos, kind="stable")
    starts = np.searchsorted(f_pos[order], np.arange(int(f_pos.max(initial=-1)) + 2))
    batches, first = [], 0  # the current batch is order[first:end]
    for a, b in zip(starts[:-1], starts[1:]):
        if a - first >= size // 2:
            batches.append(order[first:a])
            first = a
        while b - first >= size:
            batches.append(order[first : first + size])
            first += size
    if first < len(order):
        batches.append(order[first:])
    return batches


class ActiveEncoders:
    """Encoder vectors `[k, D]` and biases `[k]` (float32, on `device`) of any subset of the active
    features. Each active feature's encoder vector is read once per prompt
    (`replacement.active_encoder_rows`: from the file where the encoder is mapped) and sent to the
    device once; a subset's indices then cross in one copy that does not wait for the GPU
    (`backend.to_device`)."""

    def __init__(self, tc, f_layer: torch.Tensor, f_feat: torch.Tensor, device):
        per_layer = active_encoder_rows(tc, f_layer, f_feat)
        first = np.cumsum([0] + [len(rows) for rows, _ in per_layer])
        # f_layer ascends, so each layer's entries are one run, in order
        self.row = (  # [n_active]: its row of `vectors`
            torch.cat([which + int(first[s]) for s, (_, which) in enumerate(per_layer)])
            if len(f_feat)
            else torch.zeros(0, dtype=torch.long)
        )
        # [n_unique, D]
        self.vectors = torch.cat([rows.float() for rows, _ in per_layer]).to(device)
        self.bias = torch.cat(  # [n_active]
            [
                tc.b_enc[s].detach()[f_feat[f_layer == s].to(tc.b_enc[s].device)].float()
                for s in range(tc.n_layers)
            ]
        ).to(device)
        self.device = device

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors `[k, D]`, biases `[k]`) of the active features `idx` (indices into the active
        arrays)."""
        both = to_device(
            torch.stack([self.row[idx], torch.as_tensor(idx, dtype=torch.long)]), self.device
        )
        return self.vectors[both[0]], self.bias[both[1]]


# -- the stages of `attribute`, in the order it runs them ------------------------------------------
#
# L layers, n positions, D = d_model; k active features, n_logit logit nodes.


def _config(config: AttributionConfig | None, overrides: dict) -> AttributionConfig:
    cfg = with_overrides(config, AttributionConfig, overrides)
    # a list of its own: `dataclasses.replace` would share the caller's with the graph's settings
    return replace(cfg, targets=list(cfg.targets or []))


def load_prompt(
    lm: LoadedModel | str | None, prompt: str, transcoders, cfg: AttributionConfig
) -> tuple[LoadedModel, TranscoderSet, torch.Tensor]:
    """(the model, its transcoders on its device, the prompt's token ids `[n]`), the prompt checked
    against the model's context and `max_tokens`."""
    if not isinstance(prompt, str):
        raise UserError("the prompt must be a string")
    if lm is None or isinstance(lm, str):
        lm = load_model(lm or cfg.model, device=cfg.device, dtype=cfg.dtype)
    spec = transcoders if transcoders is not None else cfg.transcoders
    tc = resolve_transcoders(spec, lm, cfg.progress).to(lm.device)
    tokens = lm.tokenize(prompt, chat=cfg.chat)
    check_prompt(lm, tokens, cfg.max_tokens)
    return lm, tc, tokens


def trace_memory_estimate(
    lm: LoadedModel, tc: TranscoderSet, n_pos: int, cfg: AttributionConfig
) -> dict[str, int]:
    """Bytes a trace of `n_pos` tokens holds at its peak besides the model, by part: the attention
    patterns `[L, H, n, n]` twice (the forward's and the transposed model's folded copy), the
    frozen activations (residuals, MLP inputs and outputs, error vectors: `[L+1, n, D]` each), one
    batch's working memory (`memory_gb`), and the edges, a guess from the transcoders' sparsity
    (float32 value and int32 index per edge, about half the sources of each row being causal)."""
    s, f32 = lm.sites, 4
    patterns = 2 * s.n_layers * s.n_heads * n_pos * n_pos * f32
    activations = 4 * (s.n_layers + 1) * n_pos * s.d_model * f32
    per_token = (tc.cfg.k or 0) * tc.n_layers  # active features per position, where k says
    rows = min(cfg.max_feature_nodes, per_token * n_pos) + cfg.max_n_logits
    sources = n_pos * (s.n_layers + 1) + per_token * n_pos
    return {
        "attention patterns": patterns,
        "activations": activations,
        "one batch": int(cfg.memory_gb * 2**30),
        "edges (estimated)": rows * sources // 2 * (f32 + 4),
    }


def available_memory() -> int | None:
    """Bytes the system can still give this process (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_trace_memory(
    lm: LoadedModel, tc: TranscoderSet, n_pos: int, cfg: AttributionConfig
) -> None:
    """Refuse a trace whose memory would not fit, before the forward pass: the parts that are sure
    (patterns, activations, one batch) must fit into the memory available now; the edges, a guess,
    are named in the message but do not refuse on their own."""
    free = available_memory()
    parts = trace_memory_estimate(lm, tc, n_pos, cfg)
    sure = sum(v for k, v in parts.items() if "estimated" not in k)
    if free is None or sure <= free:
        return
    listed = ", ".join(f"{k} {v / 2**30:.1f} GB" for k, v in parts.items())
    raise UserError(
        f"tracing {n_pos} tokens needs at least {sure / 2**30:.1f} GB ({listed}) but "
        f"{free / 2**30:.1f} GB are available; shorten the prompt (the attention patterns grow "
        f"with its square) or lower --memory-gb"
    )


@dataclass
class FrozenPrompt:
    """The prompt with its model and transcoders, and what one forward pass of the real model
    records for the frozen local replacement model."""

    lm: LoadedModel
    transcoders: TranscoderSet  # on the model's device
    tokens: torch.Tensor  # [n] token ids
    state: PromptState  # residuals, attention patterns, norm scales, MLP inputs and outputs, logits
    weights: FrozenWeights  # the model weights the frozen linear model reads

    @classmethod
    def of(cls, lm: LoadedModel, transcoders: TranscoderSet, tokens: torch.Tensor) -> FrozenPrompt:
        return cls(lm, transcoders, tokens, run_and_freeze(lm, tokens), FrozenWeights.of(lm))

    @property
    def n_layers(self) -> int:
        return self.lm.sites.n_layers

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def d_model(self) -> int:
        return self.lm.sites.d_model


@dataclass
class ActiveFeatures:
    """The prompt's active transcoder features, on the CPU, in node order (by layer, position,
    feature)."""

    layer: torch.Tensor  # [k] the layer whose MLP input the feature reads
    pos: torch.Tensor  # [k]
    feature: torch.Tensor  # [k] its index in its layer's transcoder
    activation: torch.Tensor  # [k]
    decoders: list[tuple[torch.Tensor, torch.Tensor]]
    """per source layer, the features' decoder rows, each read once (`active_decoder_rows`)"""

    def __len__(self) -> int:
        return len(self.feature)


def active_features(frozen: FrozenPrompt, bos_features: bool) -> ActiveFeatures:
    """The features the transcoders activate on the recorded MLP inputs; with a <bos> token, none
    at its position unless `bos_features`."""
    tc = frozen.transcoders
    layer, pos, feature, activation = (t.cpu() for t in tc.sparse_encode(frozen.state.mlp_in))
    if not bos_features and frozen.lm.starts_with_bos(frozen.tokens):
        # <bos> attends only to itself, so everything at position 0 is the same for every prompt:
        # an attention sink whose huge-norm activations lie outside what transcoders are trained on
        # (they fire hundreds of features there). Its MLP outputs become the error nodes at
        # position 0 instead.
        keep = pos != 0
        layer, pos, feature, activation = layer[keep], pos[keep], feature[keep], activation[keep]
    decoders = active_decoder_rows(tc, layer, feature)
    return ActiveFeatures(layer, pos, feature, activation, decoders)


@dataclass
class FrozenNodeInputs:
    """What node inputs are read from, as the frozen linear model computes it: equal to the
    recorded activations up to rounding in float32; in bfloat16 it keeps every node exactly
    complete with respect to the linear model."""

    mlp_in: torch.Tensor  # [L, n, D] each layer's MLP input: features read it
    final: torch.Tensor  # [D] the final norm's output at the last position: logits read it


def errors_and_node_inputs(
    frozen: FrozenPrompt, features: ActiveFeatures
) -> tuple[torch.Tensor, FrozenNodeInputs]:
    """(error vectors `[L, n, D]`, node inputs). An error vector is the true MLP output minus the
    transcoders' (features, decoder bias, skip term): what makes the replacement model exact."""
    tc, state, L = frozen.transcoders, frozen.state, frozen.n_layers
    f = features
    # [L, n, D]
    feature_out = decode_sparse(
        tc, f.layer, f.pos, f.feature, f.activation, frozen.n_pos, f.decoders
    )
    skip = (
        torch.stack([tc.skip_term(l, state.mlp_in[l]).float() for l in range(L)])
        if tc.W_skip is not None
        else 0.0
    )
    errors = state.mlp_out - feature_out - skip
    fw = frozen.weights
    out = frozen_forward(
        state, fw, tc, None, errors, feature_out=feature_out, preacts=False, logits=False
    )
    return errors, FrozenNodeInputs(mlp_in=out["mlp_in"], final=out["final"])


@dataclass
class LogitTargets:
    """The logit nodes (`choose_logits`)."""

    ids: list[int]  # [n_logit] token ids
    probabilities: np.ndarray  # [n_logit] float32: the model's probability of each token
    strings: list[str]  # [n_logit] the tokens as text ("target - contrast" with a contrast)
    contrast: int | None  # the token whose logit is subtracted from the one target's

    @classmethod
    def choose(cls, frozen: FrozenPrompt, cfg: AttributionConfig) -> LogitTargets:
        return cls(*choose_logits(frozen.lm, frozen.state.logits, cfg))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TargetReadouts:
    """What each target node reads its input along: a feature, its encoder vector (plus its bias)
    in its layer's MLP input; a logit, its direction in the final norm's output."""

    encoders: ActiveEncoders
    logit_directions: torch.Tensor  # [n_logit, D] on the model's device

    @classmethod
    def of(
        cls, frozen: FrozenPrompt, features: ActiveFeatures, logits: LogitTargets
    ) -> TargetReadouts:
        fw = frozen.weights
        encoders = ActiveEncoders(frozen.transcoders, features.layer, features.feature, fw.device)
        return cls(encoders, fw.logit_directions(logits.ids, logits.contrast))


@dataclass
class NodeTable:
    """Every node, in node order: active features, error nodes (layer-major), token embeddings,
    logits. Each array is `[n_nodes]`."""

    kind: np.ndarray  # int8: FEATURE, ERROR, TOKEN or LOGIT
    layer: np.ndarray  # int32: a feature's or error's layer; -1 for tokens, L for logits
    pos: np.ndarray  # int32: logits are at the last position
    feature: np.ndarray  # int64: a feature's index in its transcoder, a logit's token; else -1
    activation: np.ndarray  # float32: features' activations, |error|, |embedding|, logits' inputs
    node_input: np.ndarray  # float32: features' pre-activations, logits' inputs; else NaN
    n_src: int  # the nodes that can be sources: all but the logits, which come last

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    @property
    def logit_nodes(self) -> np.ndarray:
        return np.arange(self.n_src, self.n_nodes)


def node_table(
    frozen: FrozenPrompt,
    features: ActiveFeatures,
    errors: torch.Tensor,
    logits: LogitTargets,
    readouts: TargetReadouts,
    inputs: FrozenNodeInputs,
) -> NodeTable:
    L, n = frozen.n_layers, frozen.n_pos
    n_feat, n_err, n_logit = len(features), L * n, len(logits)
    n_src = n_feat + n_err + n
    kind = np.concatenate(
        [
            np.full(n_feat, FEATURE),
            np.full(n_err, ERROR),
            np.full(n, TOKEN),
            np.full(n_logit, LOGIT),
        ]
    ).astype(np.int8)
    layer = np.concatenate(
        [features.layer.numpy(), np.repeat(np.arange(L), n), np.full(n, -1), np.full(n_logit, L)]
    ).astype(np.int32)
    pos = np.concatenate(
        [features.pos.numpy(), np.tile(np.arange(n), L), np.arange(n), np.full(n_logit, n - 1)]
    ).astype(np.int32)
    feature = np.concatenate(
        [features.feature.numpy(), np.full(n_err + n, -1), np.array(logits.ids)]
    ).astype(np.int64)
    f_pre = _feature_preactivations(features, readouts.encoders, inputs.mlp_in)
    logit_inputs = readouts.logit_directions @ inputs.final
    activation = np.concatenate(
        [
            features.activation.float().numpy(),
            errors.norm(dim=-1).flatten().cpu().numpy(),
            frozen.state.embeddings.norm(dim=-1).cpu().numpy(),
            logit_inputs.cpu().numpy(),
        ]
    ).astype(np.float32)
    node_input = np.full(n_src + n_logit, np.nan, dtype=np.float32)
    node_input[:n_feat] = f_pre.cpu().numpy()
    node_input[n_src:] = logit_inputs.cpu().numpy()
    return NodeTable(kind, layer, pos, feature, activation, node_input, n_src)


def _feature_preactivations(
    features: ActiveFeatures, encoders: ActiveEncoders, mlp_in: torch.Tensor
) -> torch.Tensor:
    """Encoder pre-activations `[k]` of the active features in the MLP inputs `[L, n, D]`."""
    n_feat, dev = len(features), encoders.device
    f_layer, f_pos = features.layer, features.pos
    f_pre = torch.empty(n_feat, device=dev)
    for a in range(0, n_feat, 2048):  # in chunks: three [2048, D] temporaries
        c = slice(a, a + 2048)
        enc_vecs, b_enc = encoders(torch.arange(a, min(a + 2048, n_feat)))
        f_pre[c] = (enc_vecs * mlp_in[f_layer[c].to(dev), f_pos[c].to(dev)]).sum(-1) + b_enc
    return f_pre


@dataclass
class RowSchedule:
    """How the rows are batched: the logit rows first, then up to `budget` feature rows."""

    batch_size: int  # targets per transposed pass: `batch_size`, or fewer to fit `memory_gb`
    n_features: int  # k
    budget: int  # feature rows to compute

    @classmethod
    def plan(
        cls, cfg: AttributionConfig, frozen: FrozenPrompt, n_src: int, n_features: int
    ) -> RowSchedule:
        fw, n, D = frozen.weights, frozen.n_pos, frozen.d_model
        # working memory of one batch: its rows x sources, plus a few gradients [n, H*hd] per row
        per_row = 4 * (n_src + 6 * n * max(D, fw.n_heads * fw.head_dim))
        batch_size = max(1, min(cfg.batch_size, int(cfg.memory_gb * 2**30 // per_row)))
        return cls(batch_size, n_features, min(n_features, cfg.max_feature_nodes))

    @property
    def by_position(self) -> bool:
        """Every feature gets a row, so none needs ranking: batches follow positions instead."""
        return self.budget == self.n_features

    def logit_batches(self, n_logit: int) -> Iterator[slice]:
        for a in range(0, n_logit, self.batch_size):
            yield slice(a, min(a + self.batch_size, n_logit))


class FeatureRowQueue:
    """Batches of active features (indices `[<= batch_size]` into them) whose rows come next: by
    position when the schedule covers every feature; otherwise the most influential features not
    done, re-ranked every `INFLUENCE_BATCHES` batches by `influence()` `[>= k]`, their influence on
    the logits through the rows computed so far."""

    def __init__(
        self,
        schedule: RowSchedule,
        f_pos: np.ndarray,
        f_act: np.ndarray,
        influence: Callable[[], np.ndarray],
    ):
        self.schedule, self.f_pos, self.f_act, self.influence = schedule, f_pos, f_act, influence
        self.done = np.zeros(schedule.n_features, dtype=bool)  # [k]: its row is computed
        self.n_batches = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        size, budget = self.schedule.batch_size, self.schedule.budget
        queue = _feature_batches_by_position(self.f_pos, size) if self.schedule.by_position else []
        while queue or int(self.done.sum()) < budget:
            if not queue:
                queue = self._most_influential()
            pick = queue.pop(0)
            self.done[pick] = True
            yield pick
            self.n_batches += 1

    def _most_influential(self) -> list[np.ndarray]:
        # the next few batches: the top features by influence, grouped by position so that each
        # batch's backward pass stays short
        size, budget = self.schedule.batch_size, self.schedule.budget
        infl = self.influence()[: self.schedule.n_features]
        infl[self.done] = -1.0
        # features no computed row reaches yet tie at zero: larger activations first
        order = np.lexsort((-np.abs(self.f_act), -infl))
        top = order[: min(INFLUENCE_BATCHES * size, budget - int(self.done.sum()))]
        return [top[b] for b in _feature_batches_by_position(self.f_pos[top], size)]


class BatchRows:
    """Computes the rows of batches of targets into a `RowStore`, counting them on `bar`."""

    def __init__(self, edges: SourceEdges, engine: TransposedModel, store: RowStore, bar=None):
        self.edges, self.engine, self.store, self.bar = edges, engine, store, bar

    def __call__(
        self,
        nodes: np.ndarray,
        layer: torch.Tensor,
        pos: torch.Tensor,
        vectors: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        """Targets `nodes` `[B]` (node indices), each reading the input of `layer` at `pos` along
        its row of `vectors` `[B, D]`, plus its `bias` (`[B]`, or None for none)."""
        # the transposed pass runs its targets from the top layer down
        order = torch.argsort(layer, descending=True, stable=True)
        on_device = to_device(order, vectors.device)
        rows, const = self.edges.rows(self.engine, layer[order], pos[order], vectors[on_device])
        if bias is not None:
            const = const + bias[on_device.to(bias.device)].to(const.device)
        self.store.add(nodes[order.numpy()], layer[order].numpy(), rows, const)
        if self.bar:
            self.bar.update(len(nodes))


@dataclass
class EdgeRows:
    """The computed rows: every edge into the nodes that got one."""

    adjacency: sp.csr_array  # [n_nodes, n_nodes] targets x sources; rows not computed are empty
    row_constant: np.ndarray  # [n_nodes] float32: each row's constant (biases)
    has_row: np.ndarray  # [n_nodes] bool
    n_feature_rows: int
    n_feature_batches: int
    backend: str  # what computed the feature edges (`circuits.backend.active_backend`)


def edge_rows(
    frozen: FrozenPrompt,
    features: ActiveFeatures,
    errors: torch.Tensor,
    nodes: NodeTable,
    logits: LogitTargets,
    readouts: TargetReadouts,
    schedule: RowSchedule,
    progress: bool,
) -> EdgeRows:
    """The logit rows, then the feature rows in `FeatureRowQueue`'s order."""
    state, fw, tc = frozen.state, frozen.weights, frozen.transcoders
    L, n = frozen.n_layers, frozen.n_pos
    backend = active_backend(fw.device)
    engine = TransposedModel(state, fw, tc)
    f = features
    edges = SourceEdges(state, tc, f.layer, f.pos, f.activation, f.decoders, errors, backend)
    state.drop_activations()  # the row loop below is where the peak is
    store = RowStore(nodes.n_nodes, nodes.n_src, background=torch.device(fw.device).type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(logits) + schedule.budget, desc="attribution", unit="row")
    compute = BatchRows(edges, engine, store, bar)
    logit_nodes = nodes.logit_nodes
    queue = FeatureRowQueue(
        schedule,
        f.pos.numpy(),
        nodes.activation[: len(f)],
        lambda: store.influence(logit_nodes, logits.probabilities),
    )
    try:
        for batch in schedule.logit_batches(len(logits)):
            k = batch.stop - batch.start
            targets = logit_nodes[batch]
            directions = readouts.logit_directions[batch]
            compute(targets, torch.full((k,), L), torch.full((k,), n - 1), directions, None)
        for pick in queue:
            idx = torch.as_tensor(pick)
            compute(pick, f.layer[idx], f.pos[idx], *readouts.encoders(idx))
        adjacency = store.adjacency()
    finally:
        store.close()
        if bar:
            bar.close()
    done = int(queue.done.sum())
    return EdgeRows(adjacency, store.row_constant, store.has_row, done, queue.n_batches, backend)


def _metadata(
    cfg: AttributionConfig,
    frozen: FrozenPrompt,
    logits: LogitTargets,
    schedule: RowSchedule,
    rows: EdgeRows,
    timing_s: dict[str, float],
) -> dict:
    lm, tc = frozen.lm, frozen.transcoders
    probs_all = torch.softmax(frozen.state.logits.cpu(), -1)
    return {
        "model": lm.name,
        "model_source": lm.source,
        "model_implementation": lm.meta.get("implementation"),
        "n_layers": frozen.n_layers,
        "d_model": frozen.d_model,
        "n_heads": frozen.weights.n_heads,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "transcoders": {
            "kind": tc.cfg.kind,
            "d_sae": tc.d_sae,
            "activation": tc.cfg.activation,
            "model_name": tc.cfg.model_name,
            "source": str(getattr(tc, "source", "")),
            "identity": transcoder_identity(tc),
        },
        "settings": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "logit_strings": logits.strings,
        "contrast_token": logits.contrast,
        "top_predictions": [
            [lm.tokenizer.decode([int(i)]), float(p)] for p, i in zip(*probs_all.topk(5))
        ],
        "n_active_features": schedule.n_features,
        "n_feature_rows": rows.n_feature_rows,
        "batch_size_used": schedule.batch_size,
        "n_feature_batches": rows.n_feature_batches,
        "row_order": "position" if schedule.by_position else "influence",
        "edge_backend": rows.backend
        if rows.backend in ("cpp", "cuda")
        else "torch (per-position batched matmul)",
        "timing_s": timing_s,
        "versions": {
            "gemma_circuits": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "softcap": lm.sites.final_logit_softcapping,
        "logit_input": "demeaned pre-softcap logit"
        if logits.contrast is None
        else "pre-softcap logit difference",
    }


def assemble_graph(
    prompt: str,
    frozen: FrozenPrompt,
    nodes: NodeTable,
    logits: LogitTargets,
    rows: EdgeRows,
    metadata: dict,
) -> AttributionGraph:
    decode = frozen.lm.tokenizer.decode
    return AttributionGraph(
        prompt=prompt,
        tokens=frozen.tokens.numpy().astype(np.int64),
        token_strings=[decode([int(t)]) for t in frozen.tokens],
        kind=nodes.kind,
        layer=nodes.layer,
        pos=nodes.pos,
        feature=nodes.feature,
        activation=nodes.activation,
        node_input=nodes.node_input,
        row_constant=rows.row_constant,
        has_row=rows.has_row,
        adjacency=rows.adjacency,
        logit_probabilities=logits.probabilities,
        n_layers=frozen.n_layers,
        metadata=metadata,
    )


@torch.no_grad()
def attribute(
    lm: LoadedModel | str | None = None,
    prompt: str = "",
    transcoders=None,
    config: AttributionConfig | None = None,
    **overrides,
) -> AttributionGraph:
    """Build the attribution graph of `prompt`.

    lm: a LoadedModel, or a model name/path (default: the embedded gemma-3-270m). transcoders: a
    TranscoderSet, a path, or "default". Other options as in `AttributionConfig` (keyword overrides
    work).
    """
    cfg = _config(config, overrides)
    t0 = time.perf_counter()
    lm, tc, tokens = load_prompt(lm, prompt, transcoders, cfg)
    spec = transcoders if transcoders is not None else cfg.transcoders
    check_trace_memory(lm, tc, len(tokens), cfg)
    dashboards = dashboards_for(spec, lm, tc, cfg.progress) if cfg.dashboards else None
    t_load = time.perf_counter()

    frozen = FrozenPrompt.of(lm, tc, tokens)
    features = active_features(frozen, cfg.bos_features)
    errors, inputs = errors_and_node_inputs(frozen, features)
    logits = LogitTargets.choose(frozen, cfg)
    t_forward = time.perf_counter()

    readouts = TargetReadouts.of(frozen, features, logits)
    nodes = node_table(frozen, features, errors, logits, readouts, inputs)
    del inputs  # [L, n, D]: the row loop below is where the peak is
    schedule = RowSchedule.plan(cfg, frozen, nodes.n_src, len(features))
    rows = edge_rows(frozen, features, errors, nodes, logits, readouts, schedule, cfg.progress)
    t_end = time.perf_counter()

    timing_s = dict(load=t_load - t0, forward=t_forward - t_load, attribution=t_end - t_forward)
    metadata = _metadata(cfg, frozen, logits, schedule, rows, timing_s)
    graph = assemble_graph(prompt, frozen, nodes, logits, rows, metadata)
    if dashboards is not None:
        attach_dashboards(graph, dashboards)
    return graph
