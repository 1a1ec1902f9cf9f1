"""The local replacement model of one prompt.

One forward pass of the real Hugging Face model records, for this prompt, every attention pattern
and every RMSNorm scale (input, post-attention, pre-feedforward and final norms; the q/k norms, the
rotary embedding, the query scaling, sliding windows and attention soft-capping only shape the
patterns, which are frozen whole). With those frozen, and the MLPs replaced by transcoders plus an
error term (true MLP output minus reconstruction) at every (layer, position), the map from any
residual-stream direction to any later node is linear:

    x_0      = embed(tokens) * sqrt(d_model)   (the token node; HF's embed_tokens applies the scale)
    m_l      = x_l + s_pa * (1 + w_pa) * o_proj(P_l @ v_proj(s_in * (1 + w_in) * x_l))
    mlp_in_l = s_ff * (1 + w_ff) * m_l
    x_{l+1}  = m_l + sum_{features} act * W_dec + b_dec_l + mlp_in_l @ W_skip_l + error_l
    logits   = W_U (s_f * (1 + w_f) * x_L)      (soft-capped afterwards where the config says so)

where s_* are the frozen 1/rms scales per position. The post-feedforward norm is not frozen
separately: the transcoders replace the MLP together with it (they read `mlp_in` and write
`mlp_out`, the output of post_feedforward_layernorm), and the error term absorbs whatever they miss.

`PromptState` holds the frozen quantities; `frozen_forward` runs the linear model forwards (plainly,
as the reference that tests and frozen-mode interventions use); `TransposedModel` runs its transpose
for a batch of targets at once, which is what attribution needs: one forward pass serves every
batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemma_lm.errors import UserError
from gemma_lm.models import LoadedModel
from gemma_lm.weights import StoredWeight

from .backend import to_device


@dataclass
class PromptState:
    """Everything frozen for one prompt. L layers, n positions, D = d_model, H heads. float32, on
    the model's device."""

    tokens: torch.Tensor  # [n] token ids
    resid: torch.Tensor  # [L+1, n, D] residual stream before each layer, and after the last
    # [L, H, n, n] attention probabilities (query, key); see drop_activations
    patterns: torch.Tensor | None
    s_in: torch.Tensor  # [L, n] 1/rms of the input of input_layernorm
    # [L, n] 1/rms of the input of post_attention_layernorm (the attention output)
    s_pa: torch.Tensor
    s_ff: torch.Tensor  # [L, n] 1/rms of the input of pre_feedforward_layernorm
    s_final: torch.Tensor  # [n] 1/rms of the input of the final norm
    mlp_in: torch.Tensor | None  # [L, n, D]
    mlp_out: torch.Tensor | None  # [L, n, D]
    logits: torch.Tensor  # [vocab] model logits at the last position (after soft-capping)
    # every pattern is lower-triangular: position p never reads a later position
    causal: bool = True

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def embeddings(self) -> torch.Tensor:
        """The token-embedding nodes `[n, D]`: embed(tokens) * sqrt(d_model), as the first layer
        reads them."""
        return self.resid[0]

    def drop_activations(self) -> None:
        """Free what only the forward side reads (the residuals after the embeddings, the MLP inputs
        and outputs, `[L, n, D]` each, and the patterns, `[L, H, n, n]`), keeping what the
        transposed pass reads: embeddings, norm scales, logits. For attribution once errors, node
        inputs and a `TransposedModel` (which holds its own scaled patterns) exist; `frozen_forward`
        cannot run on the state afterwards. At long prompts on the larger models this is gigabytes:
        the activations grow with the prompt and the patterns with its square (attribution's peak
        memory: `benchmarks/attribution.py`, `benchmarks/vs_circuit_tracer.py`)."""
        self.resid = self.resid[:1].clone()
        self.mlp_in = self.mlp_out = self.patterns = None


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/rms over the last dimension, in float32: what an RMSNorm divides by."""
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


@torch.no_grad()
def run_and_freeze(lm: LoadedModel, tokens: torch.Tensor) -> PromptState:
    """Run the real model on `tokens` `[n]` and record the frozen quantities (one forward pass)."""
    sites = lm.sites
    L = sites.n_layers
    rec: dict[str, list] = {
        k: [None] * L for k in ("resid", "pattern", "s_in", "s_pa", "s_ff", "mlp_in", "mlp_out")
    }
    final: dict = {}
    eps = sites.rms_norm_eps
    handles = []

    def pre_hook(key, l):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            rec[key][l] = x[0].float() if key == "resid" else rms_scale(x[0], eps)

        return hook

    def out_hook(key, l):
        def hook(module, args, output):
            if key == "pattern":
                if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                    raise RuntimeError(
                        "attention weights were not returned; the model must use eager attention"
                    )
                rec[key][l] = output[1][0].float()
            else:
                rec[key][l] = output[0].float()

        return hook

    for l, s in enumerate(sites.layers):
        handles += [
            s.block.register_forward_pre_hook(pre_hook("resid", l), with_kwargs=True),
            s.input_layernorm.register_forward_pre_hook(pre_hook("s_in", l), with_kwargs=True),
            s.post_attention_layernorm.register_forward_pre_hook(
                pre_hook("s_pa", l), with_kwargs=True
            ),
            s.pre_feedforward_layernorm.register_forward_pre_hook(
                pre_hook("s_ff", l), with_kwargs=True
            ),
            s.self_attn.register_forward_hook(out_hook("pattern", l)),
            s.pre_feedforward_layernorm.register_forward_hook(out_hook("mlp_in", l)),
            s.post_feedforward_layernorm.register_forward_hook(out_hook("mlp_out", l)),
        ]

    def final_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        final["x"] = x[0].float()
        final["s"] = rms_scale(x[0], eps)

    handles.append(sites.final_norm.register_forward_pre_hook(final_hook, with_kwargs=True))
    lm.model.config._attn_implementation = "eager"
    try:
        logits = lm.last_logits(tokens)
    finally:
        for h in handles:
            h.remove()
    patterns = torch.stack(rec["pattern"])
    return PromptState(
        tokens=tokens.cpu(),
        resid=torch.stack(rec["resid"] + [final["x"]]),
        patterns=patterns,
        s_in=torch.stack(rec["s_in"]),
        s_pa=torch.stack(rec["s_pa"]),
        s_ff=torch.stack(rec["s_ff"]),
        s_final=final["s"],
        mlp_in=torch.stack(rec["mlp_in"]),
        mlp_out=torch.stack(rec["mlp_out"]),
        logits=logits,
        causal=bool((patterns.triu(1) == 0).all()),
    )


class FrozenWeights:
    """The model weights the linear (frozen) model needs, in float32 on the model's device: per
    layer W_v `[KV*hd, D]`, W_o `[D, H*hd]`, norm gains (1 + w) `[L, D]`; the final norm gain `[D]`;
    the unembedding `[vocab, D]` (kept in the model's dtype: it is only read for the chosen logit
    rows)."""

    def __init__(self, lm: LoadedModel):
        s = lm.sites
        attn = s.layers[0].self_attn
        if (
            getattr(attn.v_proj, "bias", None) is not None
            or getattr(attn.o_proj, "bias", None) is not None
        ):
            raise UserError(
                "this model has attention biases; the replacement model supports Gemma 3 "
                "attention without biases only (attention_bias=False, as Gemma 3 ships)"
            )

        def f(t):
            return t.detach().float()

        self.W_v = [f(l.self_attn.v_proj.weight) for l in s.layers]
        self.W_o = [f(l.self_attn.o_proj.weight) for l in s.layers]
        self.g_in = torch.stack([1 + f(l.input_layernorm.weight) for l in s.layers])
        self.g_pa = torch.stack([1 + f(l.post_attention_layernorm.weight) for l in s.layers])
        self.g_ff = torch.stack([1 + f(l.pre_feedforward_layernorm.weight) for l in s.layers])
        self.g_final = 1 + f(s.final_norm.weight)
        self.W_U = s.lm_head.weight  # [vocab, D] (no_grad everywhere it is used)
        self.n_heads, self.n_kv, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.softcap = s.final_logit_softcapping
        self.n_layers = s.n_layers
        self.d_model = s.d_model
        self._unembed_mean = None

    @classmethod
    def of(cls, lm: LoadedModel) -> FrozenWeights:
        """The frozen weights of `lm`, built once per loaded model (the vocabulary mean costs a pass
        over the unembedding) and kept in `lm.meta`."""
        fw = lm.meta.get("frozen_weights")
        if fw is None or fw.W_U is not lm.sites.lm_head.weight or fw.device != lm.device:
            fw = lm.meta["frozen_weights"] = cls(lm)
        return fw

    @property
    def device(self) -> torch.device:
        return self.g_final.device

    @property
    def unembed_mean(self) -> torch.Tensor:
        """Mean unembedding vector over the vocabulary `[D]`: logit nodes read logits minus their
        mean."""
        if self._unembed_mean is None:
            total = torch.zeros(self.W_U.shape[1], dtype=torch.float64, device=self.W_U.device)
            # from the file where it is mapped (see `LoadedModel.unembed`)
            for _, rows in StoredWeight(self.W_U).row_chunks():
                total += rows.float().sum(0)
            self._unembed_mean = (total / self.W_U.shape[0]).float().to(self.device)
        return self._unembed_mean

    def unembedding_rows(self, token_ids: list[int]) -> torch.Tensor:
        """Rows `[k, D]` of the unembedding (float32, on the weights' device)."""
        return StoredWeight(self.W_U).rows(torch.as_tensor(token_ids, dtype=torch.long)).float()

    def logit_directions(self, token_ids: list[int], contrast: int | None = None) -> torch.Tensor:
        """Directions `[n, D]` in the final-norm output whose dot product is each logit node's
        input: the demeaned unembedding of each token, or the difference of two unembeddings for a
        contrast."""
        rows = self.unembedding_rows(list(token_ids) + ([] if contrast is None else [contrast]))
        if contrast is not None:
            return rows[:-1] - rows[-1:]
        return rows - self.unembed_mean[None].to(rows.device)


def attention_apply(
    fw: FrozenWeights, l: int, pattern: torch.Tensor, x_in: torch.Tensor
) -> torch.Tensor:
    """The attention of layer l with a frozen pattern `[H, n, n]` on normalised input `[..., n, D]`,
    before the post-attention norm. Returns `[..., n, D]`."""
    v = x_in @ fw.W_v[l].T  # [..., n, KV*hd]
    # [..., n, H, hd]
    v = v.unflatten(-1, (fw.n_kv, fw.head_dim)).repeat_interleave(fw.n_heads // fw.n_kv, dim=-2)
    o = torch.einsum("hqk,...khd->...qhd", pattern, v)
    return o.flatten(-2) @ fw.W_o[l].T


def frozen_forward(
    state: PromptState,
    fw: FrozenWeights,
    transcoders,
    feature_acts: list[torch.Tensor] | None,
    errors: torch.Tensor,
    embeddings: torch.Tensor | None = None,
    resid_delta: dict[int, torch.Tensor] | None = None,
    feature_out: torch.Tensor | None = None,
    preacts: bool = True,
    logits: bool = True,
) -> dict:
    """Run the linear frozen replacement model forwards.

    feature_acts[l]: dense activations `[n, F]` of layer l's features (held fixed: direct effects
    only), or feature_out `[L, n, D]`: what the features and decoder biases write to each layer's
    MLP output, decoded already (see `decode_sparse`). errors: `[L, n, D]` error terms. embeddings:
    `[n, D]` (default: the prompt's). resid_delta: optional additions to x_l. Returns the
    pre-activations `[L][n, F]` of every feature (unless preacts=False), MLP inputs and outputs
    `[L, n, D]`, residuals `[L+1, n, D]`, the final norm's output at the last position `[D]` and
    (with `logits`) the last position's pre-cap logits over the vocabulary.
    """
    x = state.embeddings if embeddings is None else embeddings
    L = fw.n_layers
    resid, pre, mlp_ins, mlp_outs = [], [], [], []
    for l in range(L):
        if resid_delta and l in resid_delta:
            x = x + resid_delta[l]
        resid.append(x)
        h = x * (state.s_in[l, :, None] * fw.g_in[l])
        a = attention_apply(fw, l, state.patterns[l], h)
        m = x + a * (state.s_pa[l, :, None] * fw.g_pa[l])
        u = m * (state.s_ff[l, :, None] * fw.g_ff[l])
        mlp_ins.append(u)
        if preacts:
            pre.append(transcoders.pre_activation(l, u).float())
        if feature_out is not None:
            y = feature_out[l] + errors[l]
        else:
            y = transcoders.b_dec[l].float() + errors[l]
            for s in transcoders.output_layers_into(l):
                w = transcoders.W_dec[s][:, l - s] if transcoders.is_clt else transcoders.W_dec[s]
                y = y + (feature_acts[s].to(w.dtype) @ w).float()
        skip = transcoders.skip_term(l, u)
        if skip is not None:
            y = y + skip.float()
        mlp_outs.append(y)
        x = m + y
    if resid_delta and L in resid_delta:
        x = x + resid_delta[L]
    resid.append(x)
    final = x[-1] * state.s_final[-1] * fw.g_final
    out = {
        "resid": torch.stack(resid),
        "preacts": pre,
        "mlp_in": torch.stack(mlp_ins),
        "mlp_out": torch.stack(mlp_outs),
        "final": final,
    }
    if logits:
        out["logits"] = StoredWeight(fw.W_U.T).left_matmul(final).float()
    return out


@torch.no_grad()
def active_decoder_rows(
    transcoders, layer: torch.Tensor, feat: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per source layer s: (the decoder rows of its active features `[n_unique, n_out, D]`, on the
    transcoders' device; for each of layer s's entries of `feat`, in order, its row there). Each row
    is read once, even for a feature active at several positions."""
    return _rows_of_active(transcoders.decoder_rows, transcoders.n_layers, layer, feat)


@torch.no_grad()
def active_encoder_rows(
    transcoders, layer: torch.Tensor, feat: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """As `active_decoder_rows`, for the encoder vectors `[n_unique, D]`
    (`TranscoderSet.encoder_rows`)."""
    return _rows_of_active(transcoders.encoder_rows, transcoders.n_layers, layer, feat)


def _rows_of_active(read, n_layers: int, layer: torch.Tensor, feat: torch.Tensor):
    out = []
    for s in range(n_layers):
        unique, which = torch.unique(feat[layer == s], return_inverse=True)
        out.append((read(s, unique.cpu()).detach(), which))
    return out


@torch.no_grad()
def decode_sparse(
    transcoders,
    layer: torch.Tensor,
    pos: torch.Tensor,
    feat: torch.Tensor,
    act: torch.Tensor,
    n_pos: int,
    decoders: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """What active features (`[k]` each, as `sparse_encode` returns them) and the decoder biases
    write to every layer's MLP output: `[L, n_pos, D]` float32, without the skip term. Reads only
    active rows (or takes them from `decoders`, as `active_decoder_rows` returns them for these
    features)."""
    tc = transcoders
    dev = tc.b_dec[0].device
    decoders = decoders if decoders is not None else active_decoder_rows(tc, layer, feat)
    out = torch.stack([b.detach().float() for b in tc.b_dec])[:, None, :].repeat(1, n_pos, 1)
    layer, pos, act = layer.to(dev), pos.to(dev), act.to(dev).float()
    for s in range(tc.n_layers):
        here = layer == s
        if not bool(here.any()):
            continue
        rows, which = decoders[s]
        which, a, p = which.to(dev), act[here][:, None], pos[here]
        # one output layer at a time: [k, D], not [k, n_out, D]
        for o, l in enumerate(tc.output_layers(s)):
            out[l].index_add_(0, p, rows[:, o].float()[which] * a)
    return out


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


# the visitor of `TransposedModel.run`: visit(l, g, k, P) with g `[P, k, D]`
Visitor = Callable[[int, torch.Tensor, int, int], None]


class TransposedModel:
    """The transpose of the frozen linear model, for batches of targets.

    A target reads either the MLP input of layer l at position p along a vector (a feature's
    encoder vector: its pre-activation) or, with l == n_layers, the final norm's output at p along a
    vector (a logit direction). Gradients are laid out `[P, k, D]` (positions first) so that every
    step is a few large matrix products. The model's weights are used as they are (views, no copies:
    folding the norm gains into them would hold a second copy of W_o and W_v, and of W_skip); the
    gains scale the gradients instead. What is constant per prompt is folded once, here:
      - the per-position scales of the input and post-attention norms into the transposed
        patterns: A[l, key, h, query] = s_in[key] * P[h, query, key] * s_pa[query], so that the
        heads sharing a KV head mix positions in one product `[P, rep*P] @ [rep*P, k*hd]`.
    Work is truncated to what can be non-zero: a target of layer l is only live from layer l down,
    and, when the patterns are causal, a target at position p only reaches positions <= p.
    """

    def __init__(self, state: PromptState, fw: FrozenWeights, transcoders):
        self.state, self.fw = state, fw
        self.L, self.n, self.D = fw.n_layers, state.n_pos, fw.d_model
        self.H, self.KV, self.hd = fw.n_heads, fw.n_kv, fw.head_dim
        D, H, hd = self.D, self.H, self.hd
        self.W_o = [w.view(D, H, hd).permute(1, 0, 2) for w in fw.W_o]  # [H, D, hd] views
        self.W_v = [w.view(self.KV, hd, D) for w in fw.W_v]  # [KV, hd, D] views
        self.W_skip = None
        if transcoders.W_skip is not None:
            # [D, D] (D_out, D_in)
            self.W_skip = [w.detach().float().to(fw.device).T for w in transcoders.W_skip]
        # [L, key, H, query]
        self.mix = (
            state.s_in[:, :, None, None]
            * state.patterns.permute(0, 3, 1, 2)
            * state.s_pa[:, None, None, :]
        ).contiguous()

    def _extent(self, pos: torch.Tensor, k: int) -> int:
        """Positions the first k rows can reach."""
        if not self.state.causal:
            return self.n
        return int(pos[:k].max()) + 1 if k else 0

    def _attention(self, l: int, gm: torch.Tensor) -> torch.Tensor:
        """Gradient `[P, k, D]` with respect to x_l through the frozen attention, from the gradient
        with respect to m_l `[P, k, D]` (without the residual path)."""
        P, k, D = gm.shape
        KV, rep, hd = self.KV, self.H // self.KV, self.hd
        go = torch.matmul((gm * self.fw.g_pa[l]).view(1, P * k, D), self.W_o[l])  # [H, P*k, hd]
        mix = self.mix[l, :P, :, :P]  # [key, H, query]
        if KV == 1:
            gv = mix.reshape(P, rep * P) @ go.view(rep * P, k * hd)  # [key, k*hd]
            gx = gv.view(P * k, hd) @ self.W_v[l][0]
        else:
            mix = mix.reshape(P, KV, rep * P).transpose(0, 1)  # [KV, key, rep*query]
            gv = torch.bmm(mix, go.view(KV, rep * P, k * hd))  # [KV, key, k*hd]
            gx = torch.bmm(gv.view(KV, P * k, hd), self.W_v[l]).sum(0)
        return gx.mul_(self.fw.g_in[l]).view(P, k, D)

    def run(
        self, layer: torch.Tensor, pos: torch.Tensor, vectors: torch.Tensor, visit: Visitor
    ) -> None:
        """Propagate B targets backwards and hand each residual gradient to `visit`.

        layer `[B]` (sorted descending; n_layers for logit targets), pos `[B]`, vectors `[B, D]`.
        visit(l, g, k, P) is called for l = L-1 .. 0 with g `[P, k, D]`, the gradient of the first k
        targets (the live ones) with respect to x_{l+1} at positions < P (where layer l's MLP
        output, so its features, error and decoder bias, are written; other rows and positions are
        zero), then with l = -1 and the gradient with respect to x_0 (the token embeddings).
        """
        st, L, D, dev = self.state, self.L, self.D, self.fw.device
        layer, pos = layer.cpu(), pos.cpu()
        if len(layer) > 1 and bool((layer[1:] > layer[:-1]).any()):
            raise ValueError("targets must be sorted by layer, descending")
        vectors = vectors.float().to(dev)
        dev_pos = to_device(pos, dev)
        # live[l]: rows live at and below layer l
        live = [int((layer >= l).sum()) for l in range(L + 1)]
        k = live[L]
        P = self._extent(pos, k)
        g = torch.zeros(P, k, D, device=dev)
        if k:
            g[dev_pos[:k], torch.arange(k, device=dev)] = vectors[:k] * (
                st.s_final[dev_pos[:k], None] * self.fw.g_final
            )
        for l in reversed(range(L)):
            if k:
                visit(l, g, k, P)
            k_new = live[l]
            if k_new == 0:
                continue
            P_new = self._extent(pos, k_new)
            if k_new > k or P_new > P:
                grown = torch.zeros(P_new, k_new, D, device=dev)
                grown[:P, :k] = g
                g, P = grown, P_new
            # gradient with respect to mlp_in_l: the skip path plus the targets that read it here
            u = g @ self.W_skip[l] if self.W_skip is not None else None
            if k_new > k:
                u = torch.zeros_like(g) if u is None else u
                u[dev_pos[k:k_new], torch.arange(k, k_new, device=dev)] += vectors[k:k_new]
            k = k_new
            g = self._below(l, g, u)
        if k:
            visit(-1, g, k, P)

    def _below(self, l: int, g: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """The gradient `[P, k, D]` at x_l from g, the gradient at x_{l+1}, and u, the gradient at
        mlp_in_l (skip path and targets reading it; None if neither). Consumes u and g."""
        P = g.shape[0]
        # through pre_feedforward_layernorm (its gain and each position's 1/rms, `[P, 1, D]`) into
        # the residual: g becomes the gradient at m_l. In place, so that only one [P, k, D]
        # gradient is held while the attention's temporaries are
        if u is not None:
            g = u.mul_(self.state.s_ff[l, :P, None, None] * self.fw.g_ff[l]).add_(g)
            del u
        return self._attention(l, g).add_(g)

    def resid_run(self, layer: int, pos: int, vectors: torch.Tensor, visit: Visitor) -> None:
        """As `run`, for B targets that read the residual stream x_layer (before layer `layer`'s
        attention) at one position `pos` along `vectors` `[B, D]`: visit(l, g, B, P) for l =
        layer-1 .. 0 with g `[P, B, D]` the gradient at x_{l+1}, then visit(-1, g, B, P) at x_0."""
        B, dev = len(vectors), self.fw.device
        P = pos + 1 if self.state.causal else self.n
        g = torch.zeros(P, B, self.D, device=dev)
        g[pos] = vectors.float().to(dev)
        for l in reversed(range(layer)):
            visit(l, g, B, P)
            u = g @ self.W_skip[l] if self.W_skip is not None else None
            g = self._below(l, g, u)
        visit(-1, g, B, P)

    def full_gradients(
        self, layer: torch.Tensor, pos: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        """Every target's gradient with respect to x_0 .. x_L: `[B, L+1, n, D]` (any target order;
        for tests and small batches: the dense result is B x (L+1) x n x D)."""
        order = torch.argsort(layer.cpu(), descending=True, stable=True)
        G = torch.zeros(len(layer), self.L + 1, self.n, self.D, device=self.fw.device)

        def visit(l, g, k, P):
            G[order[:k], l + 1, :P] = g.transpose(0, 1)

        self.run(layer.cpu()[order], pos.cpu()[order], vectors[order.to(vectors.device)], visit)
        return G


def check_prompt(lm: LoadedModel, tokens: torch.Tensor, max_tokens: int | None = None) -> None:
    """Refuse empty prompts and prompts longer than the model's context (or `max_tokens`)."""
    n = len(tokens)
    content = n - int(lm.starts_with_bos(tokens))
    if content <= 0:
        raise UserError("the prompt is empty; give at least one token of text")
    limit = min(lm.sites.max_positions, max_tokens or lm.sites.max_positions)
    if n > limit:
        what = (
            "--max-tokens"
            if max_tokens and max_tokens < lm.sites.max_positions
            else "the model's context"
        )
        raise UserError(f"the prompt has {n} tokens, more than {limit} ({what}); shorten it")
