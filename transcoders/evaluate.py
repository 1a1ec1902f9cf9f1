"""`transcoders eval`: how well a transcoder set replaces a model's MLPs, on held-out text.

Per layer: FVU (fraction of variance of the MLP output left unexplained by the reconstruction from
the true MLP input), L0 (active features per position), dead fraction (features that never fire on
the evaluation tokens) and dense fraction (features firing on more than `dense_threshold` of them:
features that fire on everything carry no information into a graph). For the whole model: next-token
cross-entropy of the clean model, of the spliced model (every MLP output replaced by its
transcoder's reconstruction, computed from the spliced model's own MLP inputs, so errors compound
through depth), and of the model with every MLP output zeroed; delta CE = spliced - clean, and CE
recovered = (zeroed - spliced) / (zeroed - clean).

The BOS position keeps its true MLP output in both interventions and is left out of the per-layer
numbers: transcoders are trained without it (Gemma's BOS activations are huge outliers), and in
attribution graphs its error node absorbs it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gemma_lm.errors import UserError
from gemma_lm.files import atomic_write_text
from gemma_lm.jobs import Command, option
from gemma_lm.models import DEFAULT_MODEL, load_model

from .data import MLPHooks, text_source, token_sequences
from .default import resolve_transcoders


@dataclass
class EvalConfig:
    """Evaluate a transcoder set on held-out text: per-layer FVU, L0, dead and dense feature
    fractions, and the change in next-token cross-entropy when every MLP is replaced by its
    transcoder."""

    transcoders: str = option(default="default", positional=True)
    """'default' (the embedded set, trained on first use) or a path in any supported layout"""
    model: str = DEFAULT_MODEL
    """the model the set belongs to (name or path)"""
    text: str = "builtin"
    """text source spec; its held-out split is used"""
    tokens: int = 8192
    """evaluation tokens (BOS positions not counted)"""
    context: int = 128
    """tokens per evaluated sequence (BOS first)"""
    batch_seqs: int = 8
    """sequences per forward pass"""
    dense_threshold: float = 0.1
    """features firing on more than this fraction of tokens count as dense"""
    json: str = "transcoders_eval.json"
    """where to write the results ("" to skip)"""
    seed: int = 0
    """order of the held-out paragraphs"""
    progress: bool = True
    """show a progress bar"""


@contextmanager
def splice(lm, tc=None, keep_bos: bool = True):
    """Replace every MLP output of `lm` by `tc`'s reconstruction (tc=None: by zero) while inside.

    The reconstruction of layer l reads the spliced model's MLP inputs of layers <= l (CLTs) through
    forward hooks at the `ModelSites`; with `keep_bos`, position 0 keeps its true MLP output."""
    sites = lm.sites
    acts: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def read(l):
        def hook(module, args, output):
            if tc is not None:
                inputs[l] = output
                acts[l] = tc.encode(l, output.float())

        return hook

    def write(l):
        def hook(module, args, output):
            if tc is None:
                new = torch.zeros_like(output)
            else:
                new = tc.b_dec[l].expand(*output.shape[:-1], -1).clone()
                for s in tc.output_layers_into(l):
                    new = new + acts[s] @ tc.decoder_weight(s)[:, l - s]
                skip = tc.skip_term(l, inputs[l].float())
                if skip is not None:
                    new = new + skip
                new = new.to(output.dtype)
            if keep_bos:
                new[:, :1] = output[:, :1]
            return new

        return hook

    try:
        for l, ls in enumerate(sites.layers):
            handles.append(ls.pre_feedforward_layernorm.register_forward_hook(read(l)))
            handles.append(ls.post_feedforward_layernorm.register_forward_hook(write(l)))
        yield
    finally:
        for h in handles:
            h.remove()


def _next_token_ce(lm, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, number of predictions) of token ids `[b, n]`."""
    logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    return float(ce), ids[:, 1:].numel()


@dataclass
class _Sums:
    """What the batches add up, per layer, over the evaluation tokens (BOS positions left out)."""

    sse: torch.Tensor  # [L] squared error of the reconstructed MLP outputs
    y_sum: torch.Tensor  # [L, d_model] the true MLP outputs
    y_sq: torch.Tensor  # [L] their squares
    l0_sum: torch.Tensor  # [L] active features
    fires: torch.Tensor  # [L, d_sae] tokens each feature fires on
    ce: dict  # summed next-token cross-entropy of the clean, spliced and zeroed models
    n_tok: int = 0
    n_pred: int = 0

    @classmethod
    def zeros(cls, n_layers: int, d_sae: int, d_model: int) -> _Sums:
        L, F = n_layers, d_sae
        return cls(
            sse=torch.zeros(L, dtype=torch.float64),
            y_sum=torch.zeros(L, d_model, dtype=torch.float64),
            y_sq=torch.zeros(L, dtype=torch.float64),
            l0_sum=torch.zeros(L, dtype=torch.float64),
            fires=torch.zeros(L, F, dtype=torch.float64),
            ce={"clean": 0.0, "spliced": 0.0, "zero": 0.0},
        )


def _eval_sequences(lm, cfg: EvalConfig) -> torch.Tensor:
    """Enough held-out sequences `[n_seqs, context]` (BOS first) for `cfg.tokens` tokens."""
    paragraphs = text_source(cfg.text, lm, "eval", seed=cfg.seed)
    n_seqs = max(1, math.ceil(cfg.tokens / (cfg.context - 1)))
    seqs = []
    for s in token_sequences(lm, paragraphs, cfg.context, cfg.seed):
        seqs.append(s)
        if len(seqs) == n_seqs:
            break
    if not seqs:
        raise UserError(
            f"the held-out text of source {cfg.text!r} is too short for one sequence of "
            f"{cfg.context} tokens; give more text or a shorter --context"
        )
    return torch.stack(seqs).to(lm.device)


def _add_batch(lm, tc, ids: torch.Tensor, sums: _Sums) -> None:
    """Add one batch of sequences `[b, n]`: the clean run (its MLP inputs and outputs feed the
    per-layer numbers), then the spliced and the zeroed runs."""
    L = tc.n_layers
    with MLPHooks(lm.sites) as h:
        total, n = _next_token_ce(lm, ids)
    sums.ce["clean"] += total
    sums.n_pred += n
    x = torch.stack([t[:, 1:] for t in h.mlp_in]).float().reshape(L, -1, tc.d_model)  # [L, N, D]
    y = torch.stack([t[:, 1:] for t in h.mlp_out]).float().reshape(L, -1, tc.d_model)
    acts = [tc.encode(l, x[l]) for l in range(L)]
    recon = tc.decode(acts, x)
    sums.sse += (recon - y).double().pow(2).sum((1, 2))
    sums.y_sum += y.double().sum(1)
    sums.y_sq += y.double().pow(2).sum((1, 2))
    for l in range(L):
        active = acts[l] > 0
        sums.l0_sum[l] += active.sum()
        sums.fires[l] += active.sum(0)
    sums.n_tok += x.shape[1]
    with splice(lm, tc):
        sums.ce["spliced"] += _next_token_ce(lm, ids)[0]
    with splice(lm, None):
        sums.ce["zero"] += _next_token_ce(lm, ids)[0]


def _per_layer(sums: _Sums, dense_threshold: float) -> list[dict]:
    var = sums.y_sq - sums.y_sum.pow(2).sum(-1) / sums.n_tok
    fvu = (sums.sse / var.clamp_min(1e-30)).tolist()
    density = sums.fires / sums.n_tok
    return [
        {
            "layer": l,
            "fvu": fvu[l],
            "l0": float(sums.l0_sum[l] / sums.n_tok),
            "dead_frac": float((sums.fires[l] == 0).double().mean()),
            "dense_frac": float((density[l] > dense_threshold).double().mean()),
        }
        for l in range(len(fvu))
    ]


def _results(tc, lm, cfg: EvalConfig, sums: _Sums, t0: float) -> dict:
    L = tc.n_layers
    layers = _per_layer(sums, cfg.dense_threshold)
    ce = {k: v / sums.n_pred for k, v in sums.ce.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "model": lm.name,
        "transcoders": {
            "kind": tc.cfg.kind,
            "activation": tc.cfg.activation,
            "d_sae": tc.d_sae,
            "k": tc.cfg.k,
            "skip": tc.cfg.skip,
        },
        "tokens": sums.n_tok,
        "text": cfg.text,
        "context": cfg.context,
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "delta_ce": ce["spliced"] - ce["clean"],
        "ce_recovered": (ce["zero"] - ce["spliced"]) / gap if gap > 0 else float("nan"),
        "mean_fvu": sum(r["fvu"] for r in layers) / L,
        "mean_l0": sum(r["l0"] for r in layers) / L,
        "mean_dead_frac": sum(r["dead_frac"] for r in layers) / L,
        "mean_dense_frac": sum(r["dense_frac"] for r in layers) / L,
        "layers": layers,
        "seconds": round(time.time() - t0, 1),
        "config": asdict(cfg),
    }


@torch.no_grad()
def evaluate_transcoders(tc, lm, cfg: EvalConfig | None = None, **overrides) -> dict:
    """Evaluate `tc` on `lm` over held-out text. Returns the results dict (see the module
    docstring)."""
    cfg = cfg or EvalConfig(**overrides)
    tc.check_compatible(lm.sites, lm.name)
    if tc.W_enc[0].dtype != torch.float32:
        import copy

        tc = copy.deepcopy(tc).float()
    ids_all = _eval_sequences(lm, cfg)  # [n_seqs, context]
    sums = _Sums.zeros(tc.n_layers, tc.d_sae, tc.d_model)
    t0 = time.time()
    batches = range(0, len(ids_all), cfg.batch_seqs)
    if cfg.progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluating transcoders", unit="batch", dynamic_ncols=True)
    for b in batches:
        _add_batch(lm, tc, ids_all[b : b + cfg.batch_seqs], sums)
    return _results(tc, lm, cfg, sums, t0)


def results_table(res: dict) -> str:
    """The results as a markdown table (per layer, then the whole-model numbers)."""
    lines = ["| layer | FVU | L0 | dead | dense |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in res["layers"]:
        lines.append(
            f"| {r['layer']} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_frac']:.1%} | "
            f"{r['dense_frac']:.1%} |"
        )
    lines.append(
        f"| mean | {res['mean_fvu']:.3f} | {res['mean_l0']:.1f} | {res['mean_dead_frac']:.1%} | "
        f"{res['mean_dense_frac']:.1%} |"
    )
    lines += [
        "",
        f"Next-token CE on {res['tokens']} held-out tokens: clean {res['ce_clean']:.3f}, "
        f"spliced {res['ce_spliced']:.3f} (delta CE {res['delta_ce']:+.3f}), all MLPs zeroed "
        f"{res['ce_zero_ablated']:.3f}; CE recovered {res['ce_recovered']:.1%}.",
    ]
    return "\n".join(lines)


def run_eval(cfg: EvalConfig, lm=None) -> dict:
    lm = lm or load_model(cfg.model)
    tc = resolve_transcoders(cfg.transcoders, lm, cfg.progress)
    res = evaluate_transcoders(tc, lm, cfg)
    res["transcoders"]["source"] = cfg.transcoders
    if cfg.json:
        atomic_write_text(Path(cfg.json), json.dumps(res, indent=2) + "\n")
    return res


def run_eval_command(cfg: EvalConfig) -> int:
    res = run_eval(cfg)
    print(results_table(res))
    if cfg.json:
        print(f"wrote {cfg.json}")
    return 0


COMMANDS = [
    Command(
        "eval",
        EvalConfig,
        run_eval_command,
        "FVU, L0, dead features and spliced delta CE of a transcoder set",
    )
]
