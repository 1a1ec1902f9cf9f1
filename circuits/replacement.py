"""The local replacement model of one prompt.

One forward pass of the real Hugging Face model records, for this prompt, every attention pattern and
every RMSNorm scale (input, post-attention, pre-feedforward and final norms; the q/k norms only shape the
patterns, which are frozen whole). With those frozen, and the MLPs replaced by transcoders plus an error
term (true MLP output minus reconstruction) at every (layer, position), the map from any residual-stream
direction to any later node is linear:

    x_0      = embed(tokens) * sqrt(d_model)                      [n_pos, D]
    m_l      = x_l + s_pa * (1 + w_pa) * o_proj(P_l @ v_proj(s_in * (1 + w_in) * x_l))
    mlp_in_l = s_ff * (1 + w_ff) * m_l
    x_{l+1}  = m_l + sum_{features} act * W_dec + b_dec_l + mlp_in_l @ W_skip_l + error_l
    logits   = W_U (s_f * (1 + w_f) * x_L)      (soft-capped afterwards where the config says so)

`PromptState` holds the frozen quantities; `frozen_forward` runs the linear model forwards (used to check
exactness and edges by finite differences, and by frozen-mode interventions); `backward` runs its transpose
for a batch of targets at once, which is what attribution needs: one forward pass serves every batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .models import LoadedModel


@dataclass
class PromptState:
    """Everything frozen for one prompt. L layers, n positions, D = d_model, H heads."""

    tokens: torch.Tensor  # [n] token ids
    resid: torch.Tensor  # [L+1, n, D] residual stream before each layer, and after the last
    patterns: torch.Tensor  # [L, H, n, n] attention probabilities
    s_in: torch.Tensor  # [L, n] 1/rms of the input of input_layernorm
    s_pa: torch.Tensor  # [L, n] 1/rms of the input of post_attention_layernorm (the attention output)
    s_ff: torch.Tensor  # [L, n] 1/rms of the input of pre_feedforward_layernorm
    s_final: torch.Tensor  # [n] 1/rms of the input of the final norm
    mlp_in: torch.Tensor  # [L, n, D]
    mlp_out: torch.Tensor  # [L, n, D]
    logits: torch.Tensor  # [vocab] model logits at the last position (after soft-capping)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def embeddings(self) -> torch.Tensor:
        return self.resid[0]


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


@torch.no_grad()
def run_and_freeze(lm: LoadedModel, tokens: torch.Tensor) -> PromptState:
    """Run the real model on `tokens` `[n]` and record the frozen quantities (one forward pass)."""
    sites = lm.sites
    L = sites.n_layers
    rec: dict[str, list] = {k: [None] * L for k in ("resid", "pattern", "s_in", "s_pa", "s_ff", "mlp_in", "mlp_out")}
    final: dict = {}
    eps = sites.rms_norm_eps
    handles = []

    def pre_hook(key, l):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if key == "resid":
                rec[key][l] = x[0].float()
            else:
                rec[key][l] = _rms_scale(x[0], eps)
        return hook

    def out_hook(key, l):
        def hook(module, args, output):
            if key == "pattern":
                if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                    raise RuntimeError("attention weights were not returned; the model must use eager attention")
                rec[key][l] = output[1][0].float()
            else:
                rec[key][l] = output[0].float()
        return hook

    for l, s in enumerate(sites.layers):
        handles += [s.block.register_forward_pre_hook(pre_hook("resid", l), with_kwargs=True),
                    s.input_layernorm.register_forward_pre_hook(pre_hook("s_in", l), with_kwargs=True),
                    s.post_attention_layernorm.register_forward_pre_hook(pre_hook("s_pa", l), with_kwargs=True),
                    s.pre_feedforward_layernorm.register_forward_pre_hook(pre_hook("s_ff", l), with_kwargs=True),
                    s.self_attn.register_forward_hook(out_hook("pattern", l)),
                    s.pre_feedforward_layernorm.register_forward_hook(out_hook("mlp_in", l)),
                    s.post_feedforward_layernorm.register_forward_hook(out_hook("mlp_out", l))]

    def final_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        final["x"] = x[0].float()
        final["s"] = _rms_scale(x[0], eps)
    handles.append(sites.final_norm.register_forward_pre_hook(final_hook, with_kwargs=True))
    lm.model.config._attn_implementation = "eager"
    try:
        out = lm.model(tokens[None].to(lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return PromptState(
        tokens=tokens.cpu(), resid=torch.stack(rec["resid"] + [final["x"]]).cpu(),
        patterns=torch.stack(rec["pattern"]).cpu(), s_in=torch.stack(rec["s_in"]).cpu(),
        s_pa=torch.stack(rec["s_pa"]).cpu(), s_ff=torch.stack(rec["s_ff"]).cpu(), s_final=final["s"].cpu(),
        mlp_in=torch.stack(rec["mlp_in"]).cpu(), mlp_out=torch.stack(rec["mlp_out"]).cpu(),
        logits=out.logits[0, -1].float().cpu())


class FrozenWeights:
    """The model weights the linear (frozen) model needs, in float32: per layer W_v `[KV*hd, D]`,
    W_o `[D, H*hd]`, norm gains (1 + w); the final norm gain; the unembedding (kept in the model's dtype)."""

    def __init__(self, lm: LoadedModel):
        s = lm.sites
        f = lambda t: t.detach().float().cpu()  # noqa: E731
        self.W_v = [f(l.self_attn.v_proj.weight) for l in s.layers]
        self.W_o = [f(l.self_attn.o_proj.weight) for l in s.layers]
        self.g_in = torch.stack([1 + f(l.input_layernorm.weight) for l in s.layers])
        self.g_pa = torch.stack([1 + f(l.post_attention_layernorm.weight) for l in s.layers])
        self.g_ff = torch.stack([1 + f(l.pre_feedforward_layernorm.weight) for l in s.layers])
        self.g_final = 1 + f(s.final_norm.weight)
        self.W_U = s.lm_head.weight.detach()  # [vocab, D]
        self.n_heads, self.n_kv, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.softcap = s.final_logit_softcapping
        self.n_layers = s.n_layers
        self._unembed_mean = None

    @property
    def unembed_mean(self) -> torch.Tensor:
        """Mean unembedding vector over the vocabulary `[D]`: logit nodes read logits minus their mean."""
        if self._unembed_mean is None:
            self._unembed_mean = self.W_U.float().mean(0).cpu()
        return self._unembed_mean

    def logit_directions(self, token_ids: list[int], contrast: int | None = None) -> torch.Tensor:
        """Directions `[n, D]` in the final-norm output whose dot product is each logit node's input:
        the demeaned unembedding of each token, or the difference of two unembeddings for a contrast."""
        rows = self.W_U[torch.as_tensor(token_ids)].float().cpu()
        if contrast is not None:
            return rows - self.W_U[contrast].float().cpu()[None]
        return rows - self.unembed_mean[None]


def attention_apply(fw: FrozenWeights, l: int, pattern: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """The attention of layer l with a frozen pattern `[H, n, n]` on normalised input `[..., n, D]`,
    before the post-attention norm. Returns `[..., n, D]`."""
    v = x_in @ fw.W_v[l].T  # [..., n, KV*hd]
    v = v.unflatten(-1, (fw.n_kv, fw.head_dim)).repeat_interleave(fw.n_heads // fw.n_kv, dim=-2)  # [..., n, H, hd]
    o = torch.einsum("hqk,...khd->...qhd", pattern, v)
    return o.flatten(-2) @ fw.W_o[l].T


def frozen_forward(state: PromptState, fw: FrozenWeights, transcoders, feature_acts: list[torch.Tensor],
                   errors: torch.Tensor, embeddings: torch.Tensor | None = None,
                   resid_delta: dict[int, torch.Tensor] | None = None) -> dict:
    """Run the linear frozen replacement model forwards.

    feature_acts[l]: dense activations `[n, F]` of layer l's features (held fixed: direct effects only).
    errors: `[L, n, D]` error terms. embeddings: `[n, D]` (default: the prompt's). resid_delta: optional
    additions to x_l. Returns pre-activations `[L, n, F]` of every feature, MLP outputs, residuals and
    the last position's pre-cap logits over the vocabulary.
    """
    x = state.embeddings if embeddings is None else embeddings
    L = fw.n_layers
    resid, preacts, mlp_outs = [], [], []
    for l in range(L):
        if resid_delta and l in resid_delta:
            x = x + resid_delta[l]
        resid.append(x)
        h = x * (state.s_in[l, :, None] * fw.g_in[l])
        a = attention_apply(fw, l, state.patterns[l], h)
        m = x + a * (state.s_pa[l, :, None] * fw.g_pa[l])
        u = m * (state.s_ff[l, :, None] * fw.g_ff[l])
        preacts.append(transcoders.pre_activation(l, u).float())
        y = transcoders.b_dec[l].float() + errors[l]
        for s in transcoders.output_layers_into(l):
            w = transcoders.W_dec[s][:, l - s] if transcoders.is_clt else transcoders.W_dec[s]
            y = y + feature_acts[s].to(w.dtype) @ w
        skip = transcoders.skip_term(l, u)
        if skip is not None:
            y = y + skip
        mlp_outs.append(y.float())
        x = m + y.float()
    if resid_delta and L in resid_delta:
        x = x + resid_delta[L]
    resid.append(x)
    final = x[-1] * state.s_final[-1] * fw.g_final
    logits = (fw.W_U.float() @ final.to(fw.W_U.device).float()).cpu()
    return {"resid": torch.stack(resid), "preacts": preacts, "mlp_out": torch.stack(mlp_outs),
            "final": final, "logits": logits}


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


def backward(state: PromptState, fw: FrozenWeights, transcoders, inject_mlp_in: tuple | None,
             inject_final: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The transpose of the frozen linear model for a batch of B targets at once.

    inject_mlp_in: (row `[k]`, layer `[k]`, pos `[k]`, vectors `[k, D]`): target `row` reads the MLP input
    of `layer` at `pos` along `vector` (a feature target's encoder vector), or None. inject_final: `[B, n, D]` gradient with
    respect to the final norm's output (a logit target's direction at the last position), or None.
    Returns G `[B, L+1, n, D]`: each target's gradient with respect to an addition to x_l (the residual
    before layer l; G[:, l+1] is where layer l's MLP output, hence its features and error, are written).
    Gradients do not pass through feature activations: edges are direct effects.
    """
    B = batch
    L, n, D = fw.n_layers, state.n_pos, state.resid.shape[-1]
    G = torch.zeros(B, L + 1, n, D)
    g = torch.zeros(B, n, D)
    if inject_final is not None:
        g = inject_final * (state.s_final[:, None] * fw.g_final)
    G[:, L] = g
    rep = fw.n_heads // fw.n_kv
    for l in reversed(range(L)):
        # x_{l+1} = m_l + [features + b_dec + skip(mlp_in_l) + error]; mlp_in_l = s_ff * g_ff * m_l
        u = None
        if inject_mlp_in is not None:
            rows, layers, pos, vecs = inject_mlp_in
            here = layers == l
            if bool(here.any()):
                u = torch.zeros(B, n, D)
                u.index_put_((rows[here], pos[here]), vecs[here].float(), accumulate=True)
        if transcoders.W_skip is not None:
            sk = g @ transcoders.W_skip[l].float().T
            u = sk if u is None else u + sk
        gm = g if u is None else g + u * (state.s_ff[l, :, None] * fw.g_ff[l])
        # m_l = x_l + s_pa * g_pa * o_proj(P @ v_proj(s_in * g_in * x_l))
        g1 = gm * (state.s_pa[l, :, None] * fw.g_pa[l])
        go = (g1 @ fw.W_o[l]).unflatten(-1, (fw.n_heads, fw.head_dim))  # [B, n, H, hd]
        gv = torch.einsum("hqk,bqhd->bkhd", state.patterns[l], go)
        gv = gv.unflatten(2, (fw.n_kv, rep)).sum(3).flatten(-2)  # [B, n, KV*hd]
        g = gm + (gv @ fw.W_v[l]) * (state.s_in[l, :, None] * fw.g_in[l])
        G[:, l] = g
    return G


def check_prompt(lm: LoadedModel, tokens: torch.Tensor, max_tokens: int | None = None) -> None:
    """Refuse empty prompts and prompts longer than the model's context (or `max_tokens`)."""
    n = len(tokens)
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    content = n - int(n > 0 and bos is not None and int(tokens[0]) == bos)
    if content <= 0:
        raise UserError("the prompt is empty; give at least one token of text")
    limit = min(lm.sites.max_positions, max_tokens or lm.sites.max_positions)
    if n > limit:
        raise UserError(f"the prompt has {n} tokens, more than the limit of {limit} "
                        f"({'--max-tokens' if max_tokens and max_tokens < lm.sites.max_positions else 'the model context'}); "
                        f"shorten it")
