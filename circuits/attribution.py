"""Attribution graphs of one prompt (Ameisen et al., 2025, "Circuit Tracing").

Nodes: active transcoder features, error nodes (layer, position), token embeddings, logits.
Edge s -> t: the direct linear effect of source s on target t's input in the frozen local replacement
model (`replacement.py`): activation x decoder vectors (summed over every layer a CLT feature writes to)
dotted with the gradient of the target. Targets are processed in batches by one transposed pass each;
feature rows are computed in order of their estimated influence on the logits, up to a budget.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from .backend import active_backend, feature_edges
from .errors import UserError
from .graph import ERROR, FEATURE, LOGIT, TOKEN, AttributionGraph
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .replacement import FrozenWeights, PromptState, backward, check_prompt, run_and_freeze, softcap


@dataclass
class AttributionConfig:
    """One job: drives both `circuits trace` and `circuits.attribute`."""

    model: str = DEFAULT_MODEL
    transcoders: str = "default"  # "default", or a path (native, Gemma Scope 2 or circuit-tracer layout)
    max_feature_nodes: int = 8192  # feature rows computed, most influential first
    batch_size: int = 256  # targets per transposed pass
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    targets: list[str] = field(default_factory=list)  # logit tokens to attribute instead of the top ones
    contrast: str | None = None  # attribute logit(target) - logit(contrast)
    chat: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    max_tokens: int = 4096  # refuse longer prompts
    memory_gb: float = 1.0  # bound on the gradient buffer of one batch
    progress: bool = True


# -- transcoders and logit targets ------------------------------------------------------------------

def resolve_transcoders(spec, lm: LoadedModel, progress: bool = True):
    """A TranscoderSet from "default", a path, or an existing set; checked against the model."""
    from transcoders import TranscoderSet
    if isinstance(spec, TranscoderSet):
        tc = spec
    elif spec in (None, "default"):
        if lm.name != DEFAULT_MODEL:
            raise UserError(f"there is no default transcoder set for {lm.name}; pass --transcoders PATH")
        from transcoders.default import load_default_transcoders
        tc = load_default_transcoders(lm, progress=progress)
    else:
        from transcoders.formats import load_any
        tc = load_any(str(spec), model=lm)
    tc.check_compatible(lm.sites, lm.name)
    return tc


def single_token(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise UserError(f"target {text!r} is {len(ids)} tokens {pieces}, not one; pick a single-token target "
                        f"(mind the leading space, e.g. ' Paris')")
    return int(ids[0])


def choose_logits(lm: LoadedModel, state: PromptState, cfg: AttributionConfig):
    """(token ids, probabilities, strings, contrast id) of the logit nodes."""
    probs = torch.softmax(state.logits.float(), -1)
    if cfg.targets:
        ids = [single_token(lm, t) for t in cfg.targets]
    else:
        if cfg.contrast:
            raise UserError("--contrast needs --target")
        top = probs.topk(max(1, cfg.max_n_logits))
        cum = top.values.cumsum(0)
        k = int((cum < cfg.desired_logit_prob).sum()) + 1
        ids = top.indices[:min(k, cfg.max_n_logits)].tolist()
    contrast = None
    if cfg.contrast:
        if len(ids) != 1:
            raise UserError("--contrast takes exactly one --target")
        contrast = single_token(lm, cfg.contrast)
    strings = [lm.tokenizer.decode([i]) for i in ids]
    if contrast is not None:
        strings = [f"{strings[0]} - {lm.tokenizer.decode([contrast])}"]
    return ids, probs[ids].numpy().astype(np.float32), strings, contrast


# -- the graph ----------------------------------------------------------------------------------------

class _Rows:
    """Computed rows, kept as CSR blocks (compact), with their target node indices."""

    def __init__(self, n_nodes: int):
        self.n_nodes = n_nodes
        self.blocks: list[sp.csr_array] = []
        self.targets: list[np.ndarray] = []
        self.constants: dict[int, float] = {}

    def add(self, targets: np.ndarray, dense: torch.Tensor, constants: torch.Tensor) -> None:
        block = sp.csr_array(dense.numpy())
        block.resize((len(targets), self.n_nodes))
        self.blocks.append(block)
        self.targets.append(targets)
        self.constants.update(zip(targets.tolist(), constants.tolist()))

    def matrix(self) -> sp.csr_array:
        """The adjacency `[n_nodes, n_nodes]` (rows not computed are empty)."""
        if not self.blocks:
            return sp.csr_array((self.n_nodes, self.n_nodes), dtype=np.float32)
        stacked = sp.vstack(self.blocks, format="csr")
        order = np.concatenate(self.targets)
        perm = sp.csr_array((np.ones(len(order), dtype=np.float32), (order, np.arange(len(order)))),
                            shape=(self.n_nodes, len(order)))
        return sp.csr_array(perm @ stacked).astype(np.float32)


def estimate_influence(adj: sp.csr_array, logit_nodes: np.ndarray, logit_weights: np.ndarray,
                       max_depth: int) -> np.ndarray:
    """Influence of every node on the logits through the rows computed so far: with A the row-normalised
    |adjacency|, w (I + A + A^2 + ...) with w the logit probabilities. The graph is a DAG of depth at
    most `max_depth`, so the series is finite."""
    a = abs(adj)
    sums = np.asarray(a.sum(axis=1)).ravel()
    sums[sums == 0] = 1.0
    a = sp.csr_array(sp.diags_array(1.0 / sums) @ a)
    v = np.zeros(adj.shape[0])
    v[logit_nodes] = logit_weights / max(logit_weights.sum(), 1e-12)
    total = np.zeros_like(v)
    at = a.T.tocsr()
    for _ in range(max_depth):
        v = at @ v
        if not v.any():
            break
        total += v
    return total


@torch.no_grad()
def attribute(lm: LoadedModel | str | None = None, prompt: str = "", transcoders=None,
              config: AttributionConfig | None = None, **overrides) -> AttributionGraph:
    """Build the attribution graph of `prompt`.

    lm: a LoadedModel, or a model name/path (default: the embedded gemma-3-270m). transcoders: a
    TranscoderSet, a path, or "default". Other options as in `AttributionConfig` (keyword overrides work).
    """
    cfg = config or AttributionConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown option {k!r}; options: {', '.join(asdict(cfg))}")
        setattr(cfg, k, v)
    if cfg.max_feature_nodes < 0 or cfg.batch_size < 1:
        raise UserError("--max-feature-nodes must be >= 0 and --batch-size >= 1")
    t0 = time.perf_counter()
    if lm is None or isinstance(lm, str):
        lm = load_model(lm or cfg.model, device=cfg.device, dtype=cfg.dtype)
    tc = resolve_transcoders(transcoders if transcoders is not None else cfg.transcoders, lm, cfg.progress)
    if not isinstance(prompt, str):
        raise UserError("the prompt must be a string")
    tokens = lm.tokenize(prompt, chat=cfg.chat)
    check_prompt(lm, tokens, cfg.max_tokens)
    t_load = time.perf_counter()

    state = run_and_freeze(lm, tokens)
    fw = FrozenWeights(lm)
    L, n, D = lm.sites.n_layers, len(tokens), lm.sites.d_model
    f_layer, f_pos, f_feat, f_act = tc.sparse_encode(state.mlp_in)
    n_feat = len(f_feat)
    recon = tc.reconstruct(state.mlp_in).float()
    errors = state.mlp_out - recon  # [L, n, D]
    logit_ids, logit_probs, logit_strings, contrast = choose_logits(lm, state, cfg)
    n_logit = len(logit_ids)
    t_forward = time.perf_counter()

    # node table: features, errors (layer, pos), tokens, logits
    n_err, n_tok = L * n, n
    n_src = n_feat + n_err + n_tok
    N = n_src + n_logit
    kind = np.concatenate([np.full(n_feat, FEATURE), np.full(n_err, ERROR), np.full(n_tok, TOKEN),
                           np.full(n_logit, LOGIT)]).astype(np.int8)
    layer = np.concatenate([f_layer.numpy(), np.repeat(np.arange(L), n), np.full(n_tok, -1),
                            np.full(n_logit, L)]).astype(np.int32)
    pos = np.concatenate([f_pos.numpy(), np.tile(np.arange(n), L), np.arange(n), np.full(n_logit, n - 1)]).astype(np.int32)
    feature = np.concatenate([f_feat.numpy(), np.full(n_err + n_tok, -1), np.array(logit_ids)]).astype(np.int64)
    enc_vecs = torch.stack([tc.W_enc[l][:, f] for l, f in zip(f_layer.tolist(), f_feat.tolist())]).float() \
        if n_feat else torch.zeros(0, D)
    b_enc = torch.stack([tc.b_enc[l][f] for l, f in zip(f_layer.tolist(), f_feat.tolist())]).float() \
        if n_feat else torch.zeros(0)
    f_pre = (enc_vecs * state.mlp_in[f_layer, f_pos]).sum(-1) + b_enc
    directions = fw.logit_directions(logit_ids, contrast)  # [n_logit, D]
    final_out = state.resid[L, -1] * state.s_final[-1] * fw.g_final
    logit_inputs = directions @ final_out
    activation = np.concatenate([f_act.float().numpy(), errors.norm(dim=-1).flatten().numpy(),
                                 state.embeddings.norm(dim=-1).numpy(), logit_inputs.numpy()]).astype(np.float32)
    node_input = np.full(N, np.nan, dtype=np.float32)
    node_input[:n_feat] = f_pre.numpy()
    node_input[n_src:] = logit_inputs.numpy()

    # per-source-layer feature groups (columns are node indices)
    groups = []
    for s in range(L):
        cols = torch.nonzero(f_layer == s).flatten()
        if len(cols):
            groups.append((s, cols, f_pos[cols], f_feat[cols], f_act[cols].float()))
    b_dec = torch.stack([tc.b_dec[l].float() for l in range(L)])  # [L, D]
    backend = active_backend("cpu")

    per_target = (L + 1) * n * D * 4
    B = max(1, min(cfg.batch_size, int(cfg.memory_gb * 2**30 // per_target)))

    def rows_for(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge rows `[B, n_src]` and bias contributions `[B]` from gradients G `[B, L+1, n, D]`."""
        out = torch.zeros(G.shape[0], n_src)
        for s, cols, p, f, a in groups:
            n_out = len(tc.output_layers(s))
            out[:, cols] = feature_edges(G[:, s + 1:s + 1 + n_out], p, f, a, tc.decoder_weight(s), backend=backend)
        out[:, n_feat:n_feat + n_err] = torch.einsum("blnd,lnd->bln", G[:, 1:], errors).flatten(1)
        out[:, n_feat + n_err:n_src] = torch.einsum("bnd,nd->bn", G[:, 0], state.embeddings)
        const = torch.einsum("bld,ld->b", G[:, 1:].sum(2), b_dec)
        return out, const

    rows = _Rows(N)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_logit + min(n_feat, cfg.max_feature_nodes), desc="attribution", unit="row")

    # logit rows
    inject = torch.zeros(n_logit, n, D)
    inject[:, -1] = directions
    G = backward(state, fw, tc, None, inject, n_logit)
    out, const = rows_for(G)
    rows.add(np.arange(n_src, N), out, const)
    if bar:
        bar.update(n_logit)

    # feature rows, most influential first
    budget = min(n_feat, cfg.max_feature_nodes)
    done = np.zeros(n_feat, dtype=bool)
    n_done = 0
    while n_done < budget:
        take = min(B, budget - n_done)
        if budget < n_feat:
            infl = estimate_influence(rows.matrix(), np.arange(n_src, N), logit_probs, L + 3)[:n_feat]
            infl[done] = -1.0
            # ties (features not yet reached) fall back to activation size
            order = np.lexsort((-np.abs(activation[:n_feat]), -infl))
            pick = order[:take]
        else:
            pick = np.flatnonzero(~done)[:take]
        done[pick] = True
        n_done += len(pick)
        idx = torch.as_tensor(pick)
        inj = (torch.arange(len(pick)), f_layer[idx], f_pos[idx], enc_vecs[idx])
        G = backward(state, fw, tc, inj, None, len(pick))
        out, const = rows_for(G)
        rows.add(pick, out, const + b_enc[idx])
        if bar:
            bar.update(len(pick))
    if bar:
        bar.close()
    adjacency = rows.matrix()
    row_constant = np.zeros(N, dtype=np.float32)
    for t, c in rows.constants.items():
        row_constant[t] = c
    has_row = np.zeros(N, dtype=bool)
    has_row[np.concatenate(rows.targets)] = True
    t_end = time.perf_counter()

    probs_all = torch.softmax(state.logits, -1)
    metadata = {
        "model": lm.name, "model_source": lm.source, "n_layers": L, "d_model": D,
        "transcoders": {"kind": tc.cfg.kind, "d_sae": tc.d_sae, "activation": tc.cfg.activation,
                        "model_name": tc.cfg.model_name, "source": str(getattr(tc, "source", ""))},
        "settings": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "logit_strings": logit_strings, "contrast_token": contrast,
        "top_predictions": [[lm.tokenizer.decode([int(i)]), float(p)] for p, i in zip(*probs_all.topk(5))],
        "n_active_features": int(n_feat), "n_feature_rows": int(n_done), "batch_size_used": int(B),
        "edge_backend": backend,
        "timing_s": {"load": t_load - t0, "forward": t_forward - t_load, "attribution": t_end - t_forward},
        "versions": {"gemma_circuits": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "softcap": lm.sites.final_logit_softcapping,
        "logit_input": "demeaned pre-softcap logit" if contrast is None else "pre-softcap logit difference",
    }
    return AttributionGraph(
        prompt=prompt, tokens=tokens.numpy().astype(np.int64),
        token_strings=[lm.tokenizer.decode([int(t)]) for t in tokens],
        kind=kind, layer=layer, pos=pos, feature=feature, activation=activation, node_input=node_input,
        row_constant=row_constant, has_row=has_row, adjacency=adjacency, logit_probabilities=logit_probs,
        n_layers=L, metadata=metadata)
