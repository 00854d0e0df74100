"""Cross-attention instrument for a diffusers UNet, and the attention-based memorization scores built on it.

Reads (and, for Ren et al.'s mitigation, edits) P = softmax(Q K^T / sqrt(d)) of the UNet's cross-attention, the
quantity behind Ren et al.'s LE/AE detectors and Chen et al.'s Bright Ending (BE). Batch layout: a UNet call on
2n rows is [uncond rows; cond rows]. Use:

    with CrossAttentionInstrument(unet, tokens=TokenRequest(steps=[0])) as inst:
        for i, t in enumerate(timesteps):
            inst.step = i                 # the caller says which sampling step each UNet call belongs to
            ...unet(...)...
    scores = le_score(inst.token_dists)   # recordings stay readable after the block; processors are restored
"""
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

BRANCHES = ("cond", "uncond", "all")
_FORWARD_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # the order UNet2DConditionModel runs them


@dataclass(frozen=True)
class CrossAttnLayer:
    """A cross-attention module: forward-order index, processor name, module path, query grid (h, w) or None."""
    index: int
    name: str
    path: str
    resolution: Optional[tuple]


def _block_resolutions(unet, hw=None):
    """{(part, block index): (h, w)} of the latent grid each block sees for an input of side hw (h, w), by default
    config.sample_size."""
    size = getattr(unet.config, "sample_size", None) if hw is None else tuple(hw)
    if size is None:
        return {}
    hw, down = ((size, size) if isinstance(size, int) else tuple(size)), []
    for block in unet.down_blocks:
        down.append(hw)
        if getattr(block, "downsamplers", None) is not None:  # stride-2 conv with padding 1: ceil(h / 2)
            hw = tuple(-(-side // 2) for side in hw)
    res = {**{("down_blocks", i): r for i, r in enumerate(down)}, ("mid_block", 0): hw}
    if len(unet.up_blocks) == len(down):  # up block i upsamples to its skip's size, i.e. mirrors down block -1-i
        res.update({("up_blocks", i): r for i, r in enumerate(reversed(down))})
    return res


def cross_attention_layers(unet):
    """The UNet's cross-attention modules in FORWARD order (down blocks, mid block, up blocks) -> [CrossAttnLayer].

    unet.attn_processors follows module registration, where UNet2DConditionModel registers up_blocks before
    mid_block; Ren et al. index layers in forward order (SD v1.4: 3 = down_blocks.1.attentions.1, 6 = mid).
    """
    found = []
    for position, (path, module) in enumerate(unet.named_modules()):
        if getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
            head = path.split(".")
            block = (head[0], int(head[1]) if len(head) > 1 and head[1].isdigit() else 0)
            found.append(((_FORWARD_RANK.get(head[0], len(_FORWARD_RANK)), block[1], position), block, path))
    res = _block_resolutions(unet)
    return [CrossAttnLayer(i, f"{path}.processor", path, res.get(block))
            for i, (_, block, path) in enumerate(sorted(found))]


def select_layers(layers, keys=None):
    """Layers chosen by forward index or name (processor name or module path); None -> all. Bad keys: ValueError."""
    if keys is None:
        return list(layers)
    names = {**{layer.name: layer for layer in layers}, **{layer.path: layer for layer in layers}}
    chosen = []
    for key in [keys] if isinstance(keys, (numbers.Integral, str)) else keys:
        if isinstance(key, numbers.Integral) and not isinstance(key, bool) and 0 <= key < len(layers):
            chosen.append(layers[int(key)])
        elif isinstance(key, str) and key in names:
            chosen.append(names[key])
        else:
            valid = "\n".join(f"  {layer.index}: {layer.name}" for layer in layers)
            raise ValueError(f"no cross-attention layer {key!r}; valid forward indices 0..{len(layers) - 1} "
                             f"or names:\n{valid}")
    return chosen


@dataclass(frozen=True)
class TokenRequest:
    """Record the head- and query-averaged token distribution (rows, K) at these steps (None: all) and layers."""
    steps: Optional[Sequence[int]] = None
    layers: Optional[Sequence] = None


@dataclass(frozen=True)
class QueryMapRequest:
    """Record the head-averaged map (rows, N queries) of token token_index[row] (one int: every row)."""
    token_index: Union[int, Sequence[int]]
    steps: Optional[Sequence[int]] = None
    layers: Optional[Sequence] = None


@dataclass(frozen=True)
class RenEdit:
    """Ren et al.'s inference-time mitigation, in every cross-attention layer at every step.

    keep_len: per prompt row (n,) or one int, L = BOS + prompt tokens + first EOS (see prompt_lengths); logits
    of positions >= L (>= L - 1 with drop_first_eos) become -inf in the uncond AND cond row of that pair, as in
    Ren's code; None: no mask. factor: C multiplying the logits of `tokens` (BOS by default) on cond rows only.
    """
    keep_len: Optional[Union[int, Sequence[int]]] = None
    factor: float = 1.25
    tokens: Sequence[int] = (0,)
    drop_first_eos: bool = False


def prompt_lengths(tokenizer, prompts):
    """L per prompt: token count incl. BOS and the first EOS, truncated to the tokenizer's max length (77)."""
    ids = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [len(row) for row in ids]


def _per_row(value, rows, what):
    """An int or a sequence of `rows` ints as a (rows,) long tensor."""
    t = torch.as_tensor(value, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(rows)
    if t.numel() != rows:
        raise ValueError(f"{what} has {t.numel()} entries for {rows} rows")
    return t


class CrossAttentionInstrument:
    """Context manager: while inside, each cross-attention processor is wrapped so it can record and edit.

    Recordings (float32, CPU, keyed by (step, forward layer index)) are token_dists[(s, l)] (rows, K) and
    query_maps[(s, l)] (rows, N); rows are the `branch` half of the batch ("cond", "uncond") or all of it.
    Idle or record-only calls return the original processor's output unchanged (bit for bit); with `edit` the
    output comes from the explicit softmax(z) V path. Set `inst.recording = False` (or use `paused()`) around
    UNet calls that must not record, e.g. torch.func.jvp passes.
    """

    def __init__(self, unet, tokens=None, query_map=None, edit=None, branch="cond"):
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        self.unet, self.tokens, self.query_map, self.edit, self.branch = unet, tokens, query_map, edit, branch
        self.layers = cross_attention_layers(unet)
        self._wanted_layers = [{layer.index for layer in select_layers(self.layers, req.layers)} if req else set()
                               for req in (tokens, query_map)]
        self._wanted_steps = [None if req is None or req.steps is None else {int(s) for s in req.steps}
                              for req in (tokens, query_map)]
        self.step, self.recording, self._saved = None, True, None
        self.token_dists, self.query_maps = {}, {}

    def __enter__(self):
        if self._saved is not None:
            raise RuntimeError("this instrument is already installed")
        saved = dict(self.unet.attn_processors)
        wrapped = dict(saved)  # every other module keeps its very own processor object
        for layer in self.layers:
            wrapped[layer.name] = _Processor(self, layer.index, saved[layer.name])
        try:
            self.unet.set_attn_processor(wrapped)
        except BaseException:
            self.unet.set_attn_processor(dict(saved))
            raise
        self._saved = saved
        return self

    def __exit__(self, *exc):
        saved, self._saved, self.step = self._saved, None, None
        self.unet.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given
        return False

    @contextmanager
    def paused(self):
        """Suspend recording (editing stays on: it is part of the model being sampled)."""
        before, self.recording = self.recording, False
        try:
            yield self
        finally:
            self.recording = before

    def _wants(self, index):
        """(record tokens?, record query map?) for a call of layer `index` at the current step."""
        if not self.recording:
            return False, False
        if self.step is None and any(index in layers for layers in self._wanted_layers):
            raise RuntimeError("set inst.step (the sampling-step index) before calling the UNet")
        return tuple(index in layers and (steps is None or self.step in steps)
                     for layers, steps in zip(self._wanted_layers, self._wanted_steps))

    def _rows(self, batch):
        if self.branch == "all":
            return slice(None)
        if batch % 2:
            raise ValueError(f"branch={self.branch!r} needs an [uncond; cond] batch, got {batch} rows")
        return slice(batch // 2, batch) if self.branch == "cond" else slice(0, batch // 2)

    def _record(self, index, probs, want_tokens, want_map):
        """Reduce probabilities (rows, heads, N, K) of layer `index` and store them for the current step."""
        probs = probs.detach()
        key = (self.step, index)
        if key in self.token_dists or key in self.query_maps:
            raise RuntimeError(f"layer {index} already recorded at step {self.step}: one UNet call per step "
                               f"records; update inst.step or pause recording for extra calls")
        if want_tokens:
            self.token_dists[key] = probs.mean(dim=(1, 2)).cpu()
        if want_map:
            rows, heads, queries, k = probs.shape
            token = _per_row(self.query_map.token_index, rows, "token_index").to(probs.device)
            if token.min() < 0 or token.max() >= k:
                raise ValueError(f"token_index must lie in [0, {k})")
            picked = probs.gather(-1, token.view(rows, 1, 1, 1).expand(rows, heads, queries, 1))
            self.query_maps[key] = picked.squeeze(-1).mean(dim=1).cpu()


class _Processor:
    """Stands in for one cross-attention module's processor while an instrument is installed."""

    def __init__(self, instrument, index, original):
        self.instrument, self.index, self.original = instrument, index, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        inst = self.instrument
        cross = encoder_hidden_states is not None
        want_tokens, want_map = inst._wants(self.index) if cross else (False, False)
        edit = inst.edit
        if edit is not None and getattr(edit, "layers", None) is not None and self.index not in edit.layers:
            edit = None  # an edit of some layers only (GUARD's blocks): the others stay the original processor's
        if edit is None or not cross:  # the original processor makes the output: bit-identical
            out = self.original(attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, **({} if temb is None else {"temb": temb}), **kwargs)
            if want_tokens or want_map:  # separate math on detached inputs, for the `branch` rows only
                with torch.no_grad():
                    rows = inst._rows(hidden_states.shape[0])
                    q, k, _, _ = _project(attn, hidden_states.detach(), encoder_hidden_states.detach(), temb)
                    z = _logits(q[rows], k[rows], _mask_bias(attn, attention_mask, q.shape[0], k.shape[2], rows))
                    inst._record(self.index, z.softmax(-1), want_tokens, want_map)
            return out
        q, k, v, shape4 = _project(attn, hidden_states, encoder_hidden_states, temb)
        probs = _edit_logits(_logits(q, k, _mask_bias(attn, attention_mask, q.shape[0], k.shape[2])), edit)
        probs = probs.softmax(-1)
        if want_tokens or want_map:
            inst._record(self.index, probs[inst._rows(q.shape[0])], want_tokens, want_map)
        return _output(attn, probs, v, hidden_states, shape4)


def _project(attn, hidden_states, context, temb):
    """q (B, heads, N, d), k and v (B, heads, K, d), and the input's 4-D shape (or None), as the processor does."""
    x = attn.spatial_norm(hidden_states, temb) if attn.spatial_norm is not None else hidden_states
    shape4 = x.shape if x.ndim == 4 else None
    if shape4 is not None:
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
               for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    q = attn.norm_q(q) if attn.norm_q is not None else q
    k = attn.norm_k(k) if attn.norm_k is not None else k
    return q, k, v, shape4


def _mask_bias(attn, attention_mask, batch, keys, rows=slice(None)):
    """Additive attention-mask bias as (B, heads, 1 or N, K) restricted to `rows`, or None."""
    if attention_mask is None:
        return None
    return attn.prepare_attention_mask(attention_mask, keys, batch).view(batch, attn.heads, -1, keys)[rows]


def _logits(q, k, bias=None):
    """z = Q K^T / sqrt(d) (+ bias) in float32: (B, heads, N, K). 1/sqrt(d) is the SDPA default the stock
    AttnProcessor2_0 uses (equal to attn.scale for Stable Diffusion)."""
    z = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    return z if bias is None else z + bias.float()


def _edit_logits(z, edit):
    """Ren et al.'s edit of logits z (2n, heads, N, K) in the [uncond; cond] layout.

    Ren's released code scales the logits of batch indices 1, 3, 5, ..., the cond row only when n = 1; for
    n > 1 ([u x n; c x n]) that hits a mix of uncond and cond rows. Here the cond half, rows n..2n-1, is scaled.
    """
    if hasattr(edit, "edit_logits"):  # an edit that defines its own rule (utils.mitigation.guard.GuardEdit)
        return edit.edit_logits(z)
    batch, keys = z.shape[0], z.shape[-1]
    if batch % 2:
        raise ValueError(f"RenEdit needs an [uncond; cond] batch, got {batch} rows")
    n = batch // 2
    if edit.factor != 1:
        scale = torch.ones(batch, 1, 1, keys, dtype=z.dtype, device=z.device)
        scale[n:, :, :, list(edit.tokens)] = edit.factor  # multiplying the rest by exactly 1 leaves them as is
        z = z * scale
    if edit.keep_len is not None:
        keep = _per_row(edit.keep_len, n, "keep_len") - int(edit.drop_first_eos)
        if keep.min() < 1:
            raise ValueError("RenEdit.keep_len must keep at least one token")
        keep = torch.cat([keep, keep]).to(z.device)  # the same mask for the uncond and cond row of each pair
        drop = torch.arange(keys, device=z.device) >= keep[:, None]  # (2n, K)
        z = z.masked_fill(drop[:, None, None, :], float("-inf"))
    return z


def _output(attn, probs, v, hidden_states, shape4):
    """Layer output from probabilities (B, heads, N, K) and values, through to_out, as the processor does."""
    out = (probs @ v.float()).transpose(1, 2).flatten(2).to(v.dtype)  # (B, N, heads*d)
    out = attn.to_out[1](attn.to_out[0](out))
    if shape4 is not None:
        out = out.transpose(1, 2).reshape(shape4)
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


# ---- scores on recorded data (higher = more memorized) -------------------------------------------------------

def entropy(p):
    """H(p) = -sum_k p_k ln p_k over the last axis, 0 ln 0 = 0, in float64: (..., K) -> (...). Apply it to the
    head/query(/layer)-averaged distribution: entropy of the mean, not mean of entropies, as Ren's code does."""
    p = torch.as_tensor(p).double()
    return -torch.special.xlogy(p, p).sum(-1)


def summary_entropy(p, start):
    """Partial entropy S = -sum_{k >= start} p_k ln p_k, NOT renormalized: p (..., R, K), start int or (R,) ->
    (..., R). Ren's "summary tokens" start at the first EOS: start = L - 1, L from prompt_lengths."""
    p = torch.as_tensor(p).double()
    keep = torch.arange(p.shape[-1]) >= _per_row(start, p.shape[-2], "start")[:, None]  # (R, K)
    return -(torch.special.xlogy(p, p) * keep).sum(-1)


def mean_distribution(token_dists, step, layers=None):
    """p_s = mean over layers of token_dists[(step, l)] (R, K) -> (R, K); layers None: all recorded at step."""
    if layers is None:
        layers = sorted(l for s, l in token_dists if s == step)
    if not layers:
        raise KeyError(f"no token distributions recorded at step {step}")
    return torch.stack([torch.as_tensor(token_dists[(step, l)]).double() for l in layers]).mean(0)


def le_score(token_dists, layer=3, step=0):
    """Ren's mode "E" (LE): H(p) of layer `layer` (forward index; 3 = down_blocks.1.attentions.1 in SD v1) at
    step `step` (0 = first sampling step): token_dists {(s, l): (R, K)} -> (R,)."""
    return entropy(token_dists[(step, layer)])


def ae_score(token_dists, num_steps, summary_start, layers=None, window=None):
    """Ren's mode "D" (AE): mean_{s in W} H(p_s) + (mean_{s in W} S(p_s) - S(p_0)) -> (R,).

    p_s = mean over cross-attention layers (mean_distribution); S = summary_entropy from summary_start (R,) or int
    (= L - 1); W = the last `window` steps, default num_steps // 5 (steps 40..49 of 50, hard-coded in Ren's code).
    """
    window = window or max(1, num_steps // 5)
    p = torch.stack([mean_distribution(token_dists, s, layers) for s in range(num_steps - window, num_steps)])
    s_first = summary_entropy(mean_distribution(token_dists, 0, layers), summary_start)
    return entropy(p).mean(0) + summary_entropy(p, summary_start).mean(0) - s_first  # p: (W, R, K)


def be_mask(query_maps, step, layers=(0, 1)):
    """Chen's BE mask: mean over `layers` (default forward 0 and 1 = down_blocks.0.attentions.0/1, the highest
    resolution) of the end-token query maps at `step` (the last sampling step): {(s, l): (R, N)} -> (R, N)."""
    return torch.stack([torch.as_tensor(query_maps[(step, l)]).double() for l in layers]).mean(0)


def be_step_score(mask, eps_diff):
    """BE at one step: ||m * (eps_c - eps_u)||_2 / mean(m) per row, m broadcast over latent channels, the norm over
    all C*H*W entries. mask (n, H*W) or, from a layer at a coarser grid, (n, H/k * W/k) for an integer k, each
    query's value then repeated over its k x k latent patch (the rule for SDXL, whose mask layers run at half the
    latent grid; Chen et al.'s SD v1.4 layers run at the latent grid, k = 1). eps_diff (n, C, H, W) -> (n,)."""
    d, m = torch.as_tensor(eps_diff).double(), torch.as_tensor(mask).double()
    n, _, h, w = d.shape
    k = math.isqrt(h * w // max(m.shape[-1], 1)) if m.dim() == 2 and m.shape[-1] else 0
    if m.dim() != 2 or m.shape[0] != n or k < 1 or h % k or w % k or m.shape[1] * k * k != h * w:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match ({n}, {h * w}) or a coarser grid of it for "
                         f"eps_diff {tuple(d.shape)}")
    if k > 1:
        m = m.reshape(n, h // k, w // k).repeat_interleave(k, dim=1).repeat_interleave(k, dim=2).reshape(n, h * w)
    return (m.reshape(n, 1, h, w) * d).flatten(1).norm(dim=1) / m.mean(1)
