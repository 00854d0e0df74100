"""The exact JVP in bounded memory: a working-set estimate, a plan that fits a byte budget, and an attention whose
forward uses the fused kernels and whose tangent is computed in query chunks.

Forward-mode AD through a diffusers UNet normally runs every attention through the math SDPA kernel (the only
one with forward-mode AD), which materializes each layer's maps: at SD v2.0's 96 x 96 latents a self-attention
map is 9216 x 9216 per head and row. Estimated working set of one JVP call on R UNet rows (R = 2 x generations,
the [uncond; cond] pair), in bytes, b = bytes per element of the UNet's dtype:

    math kernel   MATH_MAPS * R * max_layer(heads * Nq * Nk) * b_attn   + activations + weights
    chunked       CHUNK_MAPS * R * max_layer(heads * c * Nk) * b_chunk  + activations + weights   (query chunk c)
    activations   ACT * R * C0 * H * W * b           (C0 = the first block's width, H x W the latent grid)
    weights       WEIGHT_COPIES * the largest parameter tensor's bytes  (transient copies made by the kernels)

Only the largest attention layer counts (a layer's maps are freed before the next one runs). b_attn is b, except 4
for half types (math_map_bytes: the math kernel computes their maps in float32, on the CPU always and on CUDA unless
fp16/bf16 reduction was allowed; on an H200, torch 2.11, SDXL's UNet at 128 x 128 with 8 rows, the bfloat16
math-kernel JVP peaked at 24.5 GiB above its inputs, 88 % of the float32 one's 27.8 GiB); b_chunk is 4 for half
types and b otherwise (ChunkedAttention's tangent math). Constants measured on the CPU (peak RSS above the resting
set, torch 2.14, SD v1.4's UNet with random weights, 1 generation, float32): one math-kernel forward-AD attention
alone peaked at 5.1 maps, the chunked rule at 2.2 maps per chunk (output included); the whole UNet's JVP with the
chunked attention at 303 MB (16 x 16 latents) and 362 MB (32 x 32), i.e. 30 entries per row and C0*H*W entry on top
of 2.4 copies of the largest weight (the 1280 x 2560 x 3 x 3 convolution, 118 MB). The constants below carry a
margin; benchmarks/gpu_check.sh measures the CUDA allocator's peak against this estimate.

Joint-attention transformers (SD3's MMDiT, Flux; transformer_attention_shapes): every block attends over the N
image tokens and L text tokens jointly, so each attention map is (N + L) x (N + L) per head and row; the same map
terms apply (the maps are those of the same SDPA op). Their activations scale with the token sequence instead:

    activations   ACT_TOKENS * R * (N + L) * width * b     (width = heads x head dim; N = (h / 2)(w / 2) for both)
    weights       WEIGHT_COPIES_TOKENS * the largest parameter tensor's bytes

ACT_TOKENS measured on the CPU (benchmarks/flow_memory.py --measure_cpu: peak RSS above the resting set, each point
in its own process with glibc serving allocations of 64 KiB or more by mmap, so the resident set follows the live
tensors; torch 2.14, float32, 1 generation, chunked attention with 64-query chunks and its map estimate subtracted,
width 512, 256 and 1024 image tokens + 77 text tokens; the slope between the two sizes): 27.4 entries for a 4-block
SD3 transformer, 29.5 for a Flux one (2 double- + 4 single-stream blocks). Measured like the UNet's constants
instead (in one process, glibc's heap), the slopes scatter with the heap's reuse and fragmentation: 29-32 (SD3) and
47-59 (Flux). The constants (40 and 60) lie above all of these but one fresh-process heap run of SD3 (49). Check at
a third size (48 x 48 latents, 2 generations = 4 rows, same toys): measured / estimated 352 / 534 MiB (SD3, math
kernel), 166 / 253 MiB (SD3, 128-query chunks), 271 / 480 MiB (Flux, math), 183 / 339 MiB (Flux, chunks).
WEIGHT_COPIES_TOKENS is ASSUMED equal to the UNet's: at toy widths the weights are too small to resolve it
(intercepts 2.9 and 4.2 copies of a 6 MiB tensor, fixed overheads included), and at the published widths the term is
< 0.4 GB (SD3-medium's largest tensor, an adaLN projection, is 14.2 M entries; Flux-dev's 56.6 M), far below the
maps and activations. Not measured on a GPU (no GPU in that task); benchmarks/gpu_check.sh's jvp_memory_sd3 part
does.

Plan for a budget B (JvpMemory.plan): the unchunked math-kernel JVP when it fits (exactly the computation done
without a cap), else the chunked attention with all rows and the largest query chunk that fits, else fewer rows
per call (micro-batches of generations). The budget is the cap (--max_memory_gb) minus the memory already in use
(CUDA: allocated; CPU: resident), or, with no cap, SAFETY x the free memory (CUDA: free + cached-but-unused; CPU:
MemAvailable).
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

MATH_MAPS = 6.0      # attention maps alive at once in the math kernel's forward-AD attention (measured 5.1)
CHUNK_MAPS = 3.0     # maps of one query chunk alive at once in attention_tangent (measured 2.2)
ACT = 40.0           # activation entries per row and C0*H*W latent entry (measured 30)
WEIGHT_COPIES = 3.0  # transient copies of the largest parameter tensor (measured 2.4 on the CPU)
# joint-attention transformers: activation entries per row and (N + L) x width entry (measured 27 SD3, 30 Flux)
ACT_TOKENS = {"sd3": 40.0, "flux": 60.0}
WEIGHT_COPIES_TOKENS = 3.0  # transformers: copies of the largest parameter tensor (assumed: the UNet's constant)
SAFETY = 0.9         # fraction of the free memory a plan may use
MIN_CHUNK = 64      # smallest query chunk before the rows are split instead
ATTENTION_MODES = ("auto", "math", "chunked")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """One attention layer of a UNet call: heads, query length Nq, key length Nk (per row)."""
    heads: int
    queries: int
    keys: int


def transformer_kind(model):
    """'sd3' for an SD3Transformer2DModel (MMDiT), 'flux' for a FluxTransformer2DModel, None for anything else (the
    UNet path). By class name, so that a model built on the meta device (benchmarks/flow_shape.py) is recognised."""
    return {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(type(model).__name__)


def image_tokens(model, hw):
    """Image tokens of a joint-attention transformer for VAE latents of side hw (h, w): SD3 patches the latents
    p x p (p = config.patch_size, 2 for SD3), Flux packs them 2 x 2 into 64-channel tokens before its (1 x 1)
    patch embedding, so both give (h / 2)(w / 2) tokens at their published configs."""
    p = model.config.patch_size * (2 if transformer_kind(model) == "flux" else 1)
    return (hw[0] // p) * (hw[1] // p)


def transformer_attention_shapes(model, hw, context_len):
    """AttentionShape of every attention of a joint-attention transformer, from its config, for VAE latents of side
    hw and context_len text tokens (SD3: the CLIP tokens + T5's; Flux: T5's). Every MMDiT block of SD3 (and every
    double-stream block of Flux) attends over the image and text tokens jointly: N + L queries and keys; Flux's
    single-stream blocks attend over the same N + L tokens concatenated; SD3.5's dual-attention layers
    (config.dual_attention_layers) add a self-attention over the N image tokens."""
    cfg, n = model.config, image_tokens(model, hw)
    joint = AttentionShape(int(cfg.num_attention_heads), n + context_len, n + context_len)
    if transformer_kind(model) == "flux":
        return [joint] * (cfg.num_layers + cfg.num_single_layers)
    dual = [AttentionShape(int(cfg.num_attention_heads), n, n)] * len(getattr(cfg, "dual_attention_layers", ()) or ())
    return [joint] * cfg.num_layers + dual


def attention_shapes(unet, hw, context_len):
    """AttentionShape of every diffusers Attention module of a UNet2DConditionModel for latents of side hw (h, w)
    and a text context of context_len tokens. The query grid of a block is the input grid halved once per
    downsampler before it (up blocks mirror the down blocks); modules outside the blocks get the input grid.
    A joint-attention transformer (SD3, Flux) is read from its config (transformer_attention_shapes)."""
    if transformer_kind(unet):
        return transformer_attention_shapes(unet, hw, context_len)
    from .attention import _block_resolutions
    res = _block_resolutions(unet, hw)
    shapes = []
    for path, module in unet.named_modules():
        if not (hasattr(module, "heads") and hasattr(module, "to_q")):
            continue
        head = path.split(".")
        block = (head[0], int(head[1]) if len(head) > 1 and head[1].isdigit() else 0)
        h, w = res.get(block, hw)
        keys = context_len if getattr(module, "is_cross_attention", False) else h * w
        shapes.append(AttentionShape(int(module.heads), h * w, keys))
    return shapes


def _elem(dtype):
    return torch.finfo(dtype).bits // 8


def math_map_bytes(dtype, device):
    """Bytes per attention-map entry of the math SDPA kernel for inputs of `dtype` on `device`. Half types are
    upcast to float32 inside the kernel: on the CPU always, on CUDA unless
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True) was set (off by default in torch 2.11 and 2.14)."""
    b = _elem(dtype)
    if b >= 4:
        return b
    if torch.device(device).type == "cuda" and torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
        return b
    return 4


@dataclasses.dataclass(frozen=True)
class JvpPlan:
    """How one JVP over `gens` generations runs: `per_call` generations per UNet call; query_chunk None = the
    math kernel, else the chunked attention with that many query rows per chunk; estimate in bytes."""
    gens: int
    per_call: int
    query_chunk: int = None
    estimate: int = 0
    budget: int = None

    @property
    def unchanged(self):
        """True when this is the plain unchunked JVP (the computation made without a cap)."""
        return self.per_call >= self.gens and self.query_chunk is None

    def row_slices(self):
        return [slice(i, min(i + self.per_call, self.gens)) for i in range(0, self.gens, self.per_call)]


def estimate_bytes(unet, gens, hw, context_len, dtype, device, query_chunk=None):
    """Estimated JVP working set (bytes) for `gens` generations (2 * gens UNet rows); see the module docstring."""
    rows, b = 2 * gens, _elem(dtype)
    shapes = attention_shapes(unet, hw, context_len)
    if transformer_kind(unet):
        cfg = unet.config
        width = cfg.num_attention_heads * cfg.attention_head_dim
        fixed = (ACT_TOKENS[transformer_kind(unet)] * rows * (image_tokens(unet, hw) + context_len) * width * b
                 + WEIGHT_COPIES_TOKENS * max(p.numel() for p in unet.parameters()) * b)
    else:
        c0 = unet.config.block_out_channels[0]
        fixed = ACT * rows * c0 * hw[0] * hw[1] * b + WEIGHT_COPIES * max(p.numel() for p in unet.parameters()) * b
    if not shapes:
        return int(fixed)
    if query_chunk is None:
        attn = MATH_MAPS * rows * max(s.heads * s.queries * s.keys for s in shapes) * math_map_bytes(dtype, device)
    else:
        attn = CHUNK_MAPS * rows * max(s.heads * min(query_chunk, s.queries) * s.keys for s in shapes) * max(b, 4)
    return int(fixed + attn)


@dataclasses.dataclass(frozen=True)
class JvpMemory:
    """A cap on the JVP's working set. max_bytes: the whole process's (CUDA: the allocator's) memory limit, None
    = the free device memory; attention: 'auto' (math kernel if it fits, else chunked), 'math' (never chunk the
    attention; split rows only), 'chunked' (always the fused forward + chunked tangent)."""
    max_bytes: int = None
    attention: str = "auto"
    query_chunk: int = None  # with attention='chunked': this chunk instead of the largest that fits (tests)

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.max_bytes is not None and not self.max_bytes > 0:
            raise ValueError("max_bytes must be positive")

    def budget(self, device):
        """Bytes the JVP may use on `device` now (None: unknown, no cap)."""
        device = torch.device(device)
        if self.max_bytes is not None:
            return max(0, int(self.max_bytes - memory_in_use(device)))
        free = free_memory(device)
        return None if free is None else int(SAFETY * free)

    def plan(self, unet, gens, hw, context_len, dtype, device):
        """A JvpPlan for `gens` generations of latents hw through `unet` within this cap."""
        plan = plan_jvp(unet, gens, hw, context_len, dtype, device, self.budget(device), self.attention)
        if self.query_chunk and plan.query_chunk:
            plan = dataclasses.replace(plan, query_chunk=self.query_chunk)
        return plan


def plan_jvp(unet, gens, hw, context_len, dtype, device, budget, attention="auto"):
    """Choose rows per call and query chunk so that the estimated working set fits `budget` bytes (None: no
    limit). Order: unchunked math kernel; chunked attention with all rows, largest chunk (a power of two, at least
    MIN_CHUNK); then fewer rows. If nothing fits, the smallest plan (1 generation, MIN_CHUNK or math)."""
    def est(g, chunk):
        return estimate_bytes(unet, g, hw, context_len, dtype, device, chunk)

    if attention != "chunked" and (budget is None or est(gens, None) <= budget):
        return JvpPlan(gens, gens, None, est(gens, None), budget)
    longest = max((s.queries for s in attention_shapes(unet, hw, context_len)), default=1)
    for g in range(gens, 0, -1):
        if attention == "math":
            if budget is None or est(g, None) <= budget:
                return JvpPlan(gens, g, None, est(g, None), budget)
            continue
        chunk = 1 << max(0, math.ceil(math.log2(longest)))  # the whole query range, then halve
        while chunk > MIN_CHUNK and budget is not None and est(g, chunk) > budget:
            chunk //= 2
        if budget is None or est(g, chunk) <= budget or g == 1:
            chunk = min(chunk, longest)
            return JvpPlan(gens, g, chunk, est(g, chunk), budget)
    return JvpPlan(gens, 1, None, est(1, None), budget)


def memory_in_use(device):
    """Bytes in use now: the CUDA allocator's allocated bytes, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def free_memory(device):
    """Free bytes on the device: CUDA free + cached-but-unallocated; CPU: MemAvailable (None if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------------ chunked attention with a JVP rule

class ChunkedAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + bias) V whose forward runs the fused SDPA kernels and whose forward-mode derivative
    is computed in chunks of `chunk` query rows (no full attention map is ever stored).

    Shapes: q (B, heads, Nq, d), k and v (B, heads, Nk, d), bias None or broadcastable to (B, heads, Nq, Nk).
    Tangent rule, with P = softmax(S), S = Q K^T * scale + bias, O = P V, and per chunk of queries:
        dS = (dQ K^T + Q dK^T) * scale,   A = P * dS,   dO = A V - rowsum(A) * O + P dV
    in float32 for half types (cast back to q's dtype). Only forward-mode AD is defined (no backward).
    """

    @staticmethod
    def forward(q, k, v, bias, chunk):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH]
        with sdpa_kernel(fused):  # undo the math-only policy of the surrounding JVP for the primal
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, chunk = inputs
        ctx.save_for_forward(q, k, v, output)
        ctx.bias, ctx.chunk = bias, chunk

    @staticmethod
    def jvp(ctx, dq, dk, dv, dbias, dchunk):
        q, k, v, o = ctx.saved_tensors
        return attention_tangent(q, k, v, o, dq, dk, dv, ctx.bias, ctx.chunk)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("ChunkedAttention defines forward-mode AD only")


def attention_tangent(q, k, v, o, dq, dk, dv, bias=None, chunk=None):
    """Tangent of O = SDPA(q, k, v, bias) along (dq, dk, dv), in query chunks of `chunk` rows (None: all at once).
    Shapes as ChunkedAttention; dq/dk/dv may be None (zero). Computed in float32 for half types (else in q's
    dtype). Returns (B, heads, Nq, d) in q's dtype."""
    with torch.autocast(q.device.type, enabled=False):  # the JVP of a half model runs under autocast (CUDA)
        return _attention_tangent(q, k, v, o, dq, dk, dv, bias, chunk)


def _attention_tangent(q, k, v, o, dq, dk, dv, bias, chunk):
    f32 = torch.float32 if _elem(q.dtype) < 4 else q.dtype  # half types: float32 math; float32/64: their own
    b, h, nq, d = q.shape
    scale = d ** -0.5
    chunk = nq if chunk is None else max(1, int(chunk))
    k32, v32 = k.to(f32).flatten(0, 1), v.to(f32).flatten(0, 1)           # (B*h, Nk, d)
    dk32 = None if dk is None else dk.to(f32).flatten(0, 1)
    dv32 = None if dv is None else dv.to(f32).flatten(0, 1)
    out = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    for start in range(0, nq, chunk):
        sl = slice(start, min(start + chunk, nq))
        qc = q[:, :, sl].to(f32).flatten(0, 1)                                # (B*h, c, d)
        p = torch.bmm(qc, k32.transpose(1, 2)).mul_(scale)                   # S
        if bias is not None:
            p = p.view(b, h, -1, p.shape[-1]).add_(_bias_rows(bias, sl, b, h, p.shape[-1]).to(f32)).flatten(0, 1)
        p = p.softmax(-1)                                                      # P
        ds = torch.zeros_like(p) if dq is None else torch.bmm(dq[:, :, sl].to(f32).flatten(0, 1),
                                                              k32.transpose(1, 2))
        if dk32 is not None:
            ds.baddbmm_(qc, dk32.transpose(1, 2))
        a = ds.mul_(p).mul_(scale)                                             # A = P * dS
        oc = o[:, :, sl].to(f32).flatten(0, 1)
        t = torch.bmm(a, v32).addcmul_(a.sum(-1, keepdim=True), oc, value=-1)
        del a, ds
        if dv32 is not None:
            t.baddbmm_(p, dv32)
        del p
        out[:, :, sl] = t.view(b, h, -1, d).to(q.dtype)
    return out


def _bias_rows(bias, sl, b, h, nk):
    """The query rows `sl` of an additive attention bias broadcastable to (B, heads, Nq, Nk)."""
    bias = bias if bias.dim() == 4 else bias.view(*(1,) * (4 - bias.dim()), *bias.shape)
    return bias[:, :, sl] if bias.shape[2] > 1 else bias


class ChunkedJVPAttnProcessor:
    """A diffusers attention processor equal to AttnProcessor2_0 (diffusers 0.42) except that the attention goes
    through ChunkedAttention (fused forward, tangent in query chunks). Installed only during a JVP."""

    def __init__(self, chunk):
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = ChunkedAttention.apply(query, key, value, attention_mask, self.chunk)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ChunkedJVPJointAttnProcessor:
    """A diffusers attention processor equal to JointAttnProcessor2_0 (diffusers 0.42; SD3's MMDiT blocks, and its
    SD3.5 dual-attention layers, which call it without a text stream) except that the attention goes through
    ChunkedAttention. The joint attention is one SDPA over the image and text tokens concatenated, so the tangent
    rule is the same; the chunks run over the joint query range. Installed only during a JVP."""

    def __init__(self, chunk):
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual, batch_size = hidden_states, hidden_states.shape[0]

        def heads(t, norm=None):  # (B, N, heads * d) -> (B, heads, N, d), normalized per head if the block says
            t = t.view(batch_size, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
            return t if norm is None else norm(t)
        query = heads(attn.to_q(hidden_states), attn.norm_q)
        key = heads(attn.to_k(hidden_states), attn.norm_k)
        value = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:  # image tokens first, then the text tokens
            query = torch.cat([query, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
            key = torch.cat([key, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
            value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        hidden_states = ChunkedAttention.apply(query, key, value, None, self.chunk)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, query.shape[1] * query.shape[3])
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, :residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class ChunkedJVPFluxAttnProcessor:
    """A diffusers attention processor equal to FluxAttnProcessor (diffusers 0.42, the default attention backend;
    Flux's double-stream blocks with a text stream, its single-stream blocks without) except that the attention
    goes through ChunkedAttention. Text tokens come first in Flux's joint sequence; the rotary embedding is
    applied to queries and keys before the attention, so it is outside the tangent rule. Installed only during a
    JVP."""

    def __init__(self, chunk):
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # (B, N, heads, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query, e_key, e_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (e_query, e_key, e_value))
            query = torch.cat([attn.norm_added_q(e_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(e_key), key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask = attention_mask
        hidden_states = ChunkedAttention.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                               mask, self.chunk).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


# the processor a chunked JVP installs, by the model's kind (None: a UNet, ChunkedJVPAttnProcessor), and the stock
# processor it mirrors: a model whose processors are of another class (an IP-adapter, another attention backend)
# is refused rather than silently changed
_CHUNKED = {"sd3": (ChunkedJVPJointAttnProcessor, "JointAttnProcessor2_0"),
            "flux": (ChunkedJVPFluxAttnProcessor, "FluxAttnProcessor")}


def chunked_processor(model, chunk):
    """The chunked-tangent processor for every attention of `model` (ValueError when its processors are not the
    stock ones the chunked processor mirrors)."""
    kind = transformer_kind(model)
    if kind is None:
        return ChunkedJVPAttnProcessor(chunk)
    cls, stock = _CHUNKED[kind]
    other = {type(p).__name__ for p in model.attn_processors.values()} - {stock}
    backends = {getattr(p, "_attention_backend", None) for p in model.attn_processors.values()} - {None}
    if other or backends:
        raise ValueError(f"the chunked-attention JVP mirrors diffusers' {stock}; this {type(model).__name__} has "
                         f"{sorted(other) or 'another attention backend'}: run the JVP unchunked (no --max_memory_gb)")
    return cls(chunk)


class chunked_attention:  # noqa: N801 (a context manager used like a function)
    """Context manager: every attention processor of `unet` (a UNet, SD3's or Flux's transformer) is its chunked
    processor (chunked_processor) inside the block; the processors found on entry (the stock ones, or an
    instrument's wrappers) are restored on exit."""

    def __init__(self, unet, chunk):
        self.unet, self.chunk, self.saved = unet, chunk, None

    def __enter__(self):
        processor = chunked_processor(self.unet, self.chunk)
        self.saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(processor)
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(dict(self.saved))  # set_attn_processor pops from the dict it is given
        return False
