"""One interface for per-layer (PLT), skip and cross-layer (CLT) transcoders.

Shapes (L = n_layers, D = d_model, F = d_sae features per layer):
  W_enc[l]  [D, F]            reads the MLP input of layer l
  b_enc[l]  [F]
  threshold[l] [F]            JumpReLU thresholds / BatchTopK inference threshold
  W_dec[l]  PLT/skip: [F, D]  writes the MLP output of layer l
            CLT:      [F, L - l, D]  writes the MLP outputs of layers l..L-1
  b_dec[l]  [D]               bias of the MLP output of layer l
  W_skip[l] [D, D]            affine skip term: out += x @ W_skip[l]  (skip kinds only)

The MLP output of layer l is reconstructed as
  sum_{s <= l} act_s @ W_dec[s][:, l - s] + b_dec[l] + mlp_in[l] @ W_skip[l]
where only s == l contributes for PLT/skip sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from gemma_lm.errors import UserError
from gemma_lm.weights import StoredWeight

Kind = Literal["plt", "skip", "clt"]
Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]
KINDS, ACTIVATIONS = get_args(Kind), get_args(Activation)


@dataclass
class TranscoderConfig:
    kind: str  # plt | skip | clt
    n_layers: int
    d_model: int
    d_sae: int
    activation: str = "jumprelu"
    k: int | None = None  # TopK / BatchTopK
    skip: bool = False  # affine skip term (always True for kind == "skip"; optional for CLTs)
    model_name: str = ""
    input_site: str = "mlp_in"  # output of pre_feedforward_layernorm
    output_site: str = "mlp_out"  # output of post_feedforward_layernorm
    matryoshka_prefixes: list[int] | None = None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown transcoder kind {self.kind!r}; use one of {KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of {ACTIVATIONS}")
        if self.kind == "skip":
            self.skip = True
        if self.activation in ("topk", "batchtopk") and not self.k:
            raise ValueError(f"activation {self.activation} needs k")

    def to_dict(self) -> dict:
        return asdict(self)


class TranscoderSet(nn.Module):
    """Transcoders for every layer of one model. See the module docstring for shapes."""

    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        L, D, F = cfg.n_layers, cfg.d_model, cfg.d_sae
        self.W_enc = nn.ParameterList([nn.Parameter(torch.zeros(D, F)) for _ in range(L)])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(F)) for _ in range(L)])
        self.W_dec = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(F, L - l, D) if cfg.kind == "clt" else torch.zeros(F, D))
                for l in range(L)
            ]
        )
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(D)) for _ in range(L)])
        self.threshold = nn.ParameterList(
            [nn.Parameter(torch.zeros(F), requires_grad=False) for _ in range(L)]
        )
        self.W_skip = (
            nn.ParameterList([nn.Parameter(torch.zeros(D, D)) for _ in range(L)])
            if cfg.skip
            else None
        )

    # -- shape facts --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def is_clt(self) -> bool:
        return self.cfg.kind == "clt"

    def output_layers(self, layer: int) -> range:
        """The layers whose MLP output a feature of source layer `layer` writes to."""
        return range(layer, self.n_layers) if self.is_clt else range(layer, layer + 1)

    def output_layers_into(self, layer: int) -> range:
        """The source layers whose features write to the MLP output of `layer`."""
        return range(0, layer + 1) if self.is_clt else range(layer, layer + 1)

    # -- encoding -----------------------------------------------------------------------------
    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations `[..., F]` of MLP input `x` `[..., D]`."""
        return x.to(self.W_enc[layer].dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        """Feature activations from pre-activations (inference rule: BatchTopK uses its
        threshold)."""
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu" or act == "batchtopk":
            return pre * (pre > self.threshold[layer])
        # topk: keep the k largest per position
        k = min(self.cfg.k, pre.shape[-1])
        vals, idx = torch.relu(pre).topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.activate(layer, self.pre_activation(layer, x))

    def sparse_encode(self, mlp_in: torch.Tensor):
        """Active features of MLP inputs `[L, n_pos, D]`. A memory-mapped encoder is read from its
        file a chunk at a time (`gemma_lm.weights`), so this one pass over every encoder leaves them
        off the process's memory.

        Returns (layer, pos, feature, activation), each `[n_active]`, sorted by layer, position,
        feature."""
        out = []
        for l in range(self.n_layers):
            acts = self.activate(
                l, StoredWeight(self.W_enc[l]).left_matmul(mlp_in[l]) + self.b_enc[l]
            )
            pos, feat = acts.nonzero(as_tuple=True)
            out.append((torch.full_like(pos, l), pos, feat, acts[pos, feat]))
        return tuple(torch.cat(t) for t in zip(*out))

    def encoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Encoder vectors of a subset of features of layer `layer`: `[n, D]`, a tensor of its own,
        read from the file where the encoder is a memory-mapped view of one (see
        `sparse_encode`)."""
        return StoredWeight(self.W_enc[layer]).columns(features)

    # -- decoding -----------------------------------------------------------------------------
    def decoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder vectors of a subset of features of source layer `layer`: `[n, n_out, D]` (n_out =
        1 for PLTs), a tensor of its own. Reads only those rows: from the file where the decoder is
        a memory-mapped view of one (`gemma_lm.weights`), so the rest of the decoder stays off this
        process's memory."""
        rows = StoredWeight(self.W_dec[layer]).rows(features)
        return rows if self.is_clt else rows.unsqueeze(1)

    def decoder_weight(self, layer: int) -> torch.Tensor:
        """The stored decoder of source layer `layer` as `[F, n_out, D]` (a view, nothing
        copied)."""
        w = self.W_dec[layer]
        return w if self.is_clt else w.unsqueeze(1)

    def skip_term(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.W_skip is None:
            return None
        return x.to(self.W_skip[layer].dtype) @ self.W_skip[layer]

    def decode(self, acts: list[torch.Tensor], mlp_in: torch.Tensor | None = None) -> torch.Tensor:
        """MLP outputs `[L, ..., D]` from dense activations `acts[l]` `[..., F]` (and MLP inputs for
        the skip term)."""
        outs = []
        for l in range(self.n_layers):
            y = self.b_dec[l].expand(*acts[l].shape[:-1], self.d_model).clone()
            for s in self.output_layers_into(l):
                w = self.W_dec[s][:, l - s] if self.is_clt else self.W_dec[s]
                y = y + acts[s] @ w
            if self.W_skip is not None:
                if mlp_in is None:
                    raise ValueError("a skip transcoder needs the MLP inputs to decode")
                y = y + self.skip_term(l, mlp_in[l])
            outs.append(y)
        return torch.stack(outs)

    def reconstruct(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """Reconstructed MLP outputs `[L, ..., D]` of MLP inputs `[L, ..., D]`."""
        return self.decode([self.encode(l, mlp_in[l]) for l in range(self.n_layers)], mlp_in)

    def forward(self, mlp_in: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(mlp_in)

    # -- compatibility ------------------------------------------------------------------------
    def check_compatible(self, sites, model_name: str = "") -> None:
        """Refuse a transcoder set that does not fit a model (layers, d_model, sites)."""
        c = self.cfg
        problems = []
        if c.n_layers != sites.n_layers:
            problems.append(f"{c.n_layers} layers vs the model's {sites.n_layers}")
        if c.d_model != sites.d_model:
            problems.append(f"d_model {c.d_model} vs the model's {sites.d_model}")
        if (c.input_site, c.output_site) != (sites.transcoder_input, sites.transcoder_output):
            problems.append(
                f"sites {c.input_site}->{c.output_site} vs "
                f"{sites.transcoder_input}->{sites.transcoder_output}"
            )
        if problems:
            raise UserError(
                f"transcoders for {c.model_name or 'an unnamed model'} do not fit model "
                f"{model_name or 'given'}: " + "; ".join(problems)
            )
