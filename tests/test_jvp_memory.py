"""The bounded-memory exact JVP: the chunked attention's tangent rule against forward-mode AD through the math
kernel, chunked and micro-batched JVPs equal to the unchunked one, the plan's choices, processors restored, CLI."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import detect_mem
from utils.models.jvp_memory import (ACT, WEIGHT_COPIES, ChunkedAttention, JvpMemory, attention_shapes,
    attention_tangent, estimate_bytes, math_map_bytes, plan_jvp)
from utils.models.denoisers import denoiser
from utils.models.conditioning import Conditioning


def _math_jvp(q, k, v, dq, dk, dv, bias=None):
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        return jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias), (q, k, v), (dq, dk, dv))


@pytest.mark.parametrize("chunk", [None, 5, 16])
def test_tangent_rule_equals_forward_ad_through_the_math_kernel(chunk):
    g = torch.Generator().manual_seed(0)
    q, dq = (torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v, dk, dv = (torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64) for _ in range(4))
    bias = torch.randn(2, 3, 16, 11, generator=g, dtype=torch.float64)
    o, want = _math_jvp(q, k, v, dq, dk, dv, bias)
    torch.testing.assert_close(attention_tangent(q, k, v, o, dq, dk, dv, bias, chunk), want, rtol=1e-12, atol=1e-12)
    # through torch.func.jvp (the path the UNet takes), with k and v constant (cross-attention)
    with torch.no_grad():
        out, tan = jvp(lambda a: ChunkedAttention.apply(a, k, v, None, chunk), (q,), (dq,))
    o2, want2 = _math_jvp(q, k, v, dq, torch.zeros_like(dk), torch.zeros_like(dv))
    torch.testing.assert_close(out, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, want2, rtol=1e-12, atol=1e-12)


def test_half_precision_tangent_is_computed_in_float32_and_returned_in_its_dtype():
    g = torch.Generator().manual_seed(1)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 32, 8, generator=g, dtype=torch.float64) for _ in range(6))
    _, want = _math_jvp(q, k, v, dq, dk, dv)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*half)
    got = attention_tangent(*half, o, *(t.to(torch.bfloat16) for t in (dq, dk, dv)), chunk=8)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).norm() / want.norm()) < 2e-2  # bfloat16 inputs, float32 math
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a half-precision JVP on CUDA: still float32 math
        under = attention_tangent(*half, o, *(t.to(torch.bfloat16) for t in (dq, dk, dv)), chunk=8)
    assert torch.equal(under, got)


@pytest.fixture(scope="module")
def tiny64(tiny_eps):
    """The tiny pipeline's UNet in float64 with two prompts x 2 generations at its 8 x 8 latents."""
    pipe = tiny_eps
    unet = copy.deepcopy(pipe.unet).double()
    with torch.no_grad():
        cond = pipe.encode_prompt(["a cat", "digit seven"], "cpu", 1, False)[0].double()
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0].double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    return unet, pipe.scheduler, Conditioning.of(cond, uncond, 2), x, v


@pytest.mark.parametrize("memory", [JvpMemory(attention="chunked", query_chunk=24),   # 64 queries: 24 + 24 + 16
                                    JvpMemory(max_bytes=1, attention="auto"),          # 1 generation per call
                                    JvpMemory(max_bytes=1, attention="math")])
def test_capped_jvp_equals_the_unchunked_jvp(tiny64, memory):
    unet, sched, emb, x, v = tiny64
    t = 981
    want = denoiser(unet, sched).hvp_delta(x, t, emb, v)
    model = denoiser(unet, sched, jvp_memory=memory)
    plan = model.jvp_plan(x, emb)
    assert not plan.unchanged
    before = {k: type(p) for k, p in unet.attn_processors.items()}
    got = model.hvp_delta(x, t, emb, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())
    assert {k: type(p) for k, p in unet.attn_processors.items()} == before  # stock processors restored


def test_plan_choices_and_estimates(tiny64):
    unet, _, _, _, _ = tiny64
    shapes = attention_shapes(unet, (8, 8), 77)
    # tiny UNet: 3 transformer blocks (2 down/up at 8 x 8, ... ) each with self- and cross-attention
    assert {(s.queries, s.keys) for s in shapes} == {(64, 64), (64, 77), (16, 16), (16, 77)}
    hw, args = (8, 8), (77, torch.float64, "cpu")
    whole = estimate_bytes(unet, 4, hw, *args)
    assert plan_jvp(unet, 4, hw, *args, budget=None).unchanged
    assert plan_jvp(unet, 4, hw, *args, budget=whole).unchanged
    chunked = plan_jvp(unet, 4, hw, *args, budget=whole - 1)
    assert chunked.per_call == 4 and chunked.query_chunk is not None and chunked.estimate <= whole - 1
    assert estimate_bytes(unet, 2, hw, *args) < whole and estimate_bytes(unet, 4, hw, *args, query_chunk=16) < whole
    tight = plan_jvp(unet, 4, hw, *args, budget=1)
    assert tight.per_call == 1 and [s.stop for s in tight.row_slices()] == [1, 2, 3, 4]
    assert plan_jvp(unet, 4, hw, *args, budget=1, attention="math").query_chunk is None
    assert not plan_jvp(unet, 4, hw, *args, budget=None, attention="chunked").unchanged
    with pytest.raises(ValueError):
        JvpMemory(attention="flash")


def test_math_kernel_maps_of_half_types_count_four_bytes(tiny64):
    """The math SDPA kernel upcasts half types to float32 (CPU always; CUDA unless fp16/bf16 reduction is allowed).
    Counting bfloat16 maps at 2 bytes underestimated a bfloat16 JVP on an H200 (SDXL, 8 rows: 18.3 GiB estimated,
    24.5 GiB measured; its attention took the same memory as in float32)."""
    bf16 = torch.bfloat16
    assert math_map_bytes(bf16, "cpu") == math_map_bytes(bf16, "cuda") == 4 == math_map_bytes(torch.float32, "cuda")
    assert math_map_bytes(torch.float64, "cpu") == 8
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    try:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
        assert math_map_bytes(bf16, "cuda") == 2 and math_map_bytes(bf16, "cpu") == 4
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
    # so a bfloat16 and a float32 estimate on CUDA differ only by the activations and weight copies (2 bytes each)
    unet = tiny64[0]
    fixed_entries = ACT * 8 * unet.config.block_out_channels[0] * 8 * 8 + WEIGHT_COPIES * max(
        p.numel() for p in unet.parameters())
    diff = (estimate_bytes(unet, 4, (8, 8), 77, torch.float32, "cuda")
            - estimate_bytes(unet, 4, (8, 8), 77, bf16, "cuda"))
    assert abs(diff - 2 * fixed_entries) <= 1


def test_processors_restored_after_an_error_inside(tiny64):
    unet, sched, emb, x, v = tiny64
    before = dict(unet.attn_processors)
    model = denoiser(unet, sched, jvp_memory=JvpMemory(attention="chunked"))
    with pytest.raises(Exception):
        model.hvp_delta(x, 981, emb[:, :, :5], v)  # wrong embedding width: fails inside the UNet
    assert all(unet.attn_processors[k] is p for k, p in before.items())


def test_script_memory_cap_equals_default_and_bad_values_exit_2(tiny_eps_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a photo of a cat\ndigit seven")
    base = ["--model_id", tiny_eps_dir, "--data_path", str(tmp_path / "p.txt"), "--gen_num", "2", "--device", "cpu"]

    def run(*extra):
        try:
            detect_mem.main([*base, *extra])
        except SystemExit as e:
            return e.code
        return 0

    assert run("--out_dir", str(tmp_path / "a")) == 0
    assert run("--out_dir", str(tmp_path / "b"), "--max_memory_gb", "1e-6") == 0  # below the resident set: 1 gen/call
    a, b = (torch.load(tmp_path / d / "p_gen2.pt", weights_only=True) for d in "ab")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    for bad in (["--max_memory_gb", "0"], ["--max_memory_gb", "nan"], ["--jvp_attention", "flash"]):
        capsys.readouterr()
        assert run("--out_dir", str(tmp_path / "c"), *bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


@pytest.fixture(scope="module")
def tiny_xl64():
    """A tiny UNet with SDXL base's layout in float64: no attention in the first down block, two down blocks with
    cross-attention (the last deeper), added conditions 'text_time' (pooled text_embeds (B, 8) and time_ids
    (B, 6)). One prompt x 2 generations at 16 x 16 latents, a 7-token context of width 12."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4), use_linear_projection=True, cross_attention_dim=12,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4).double().eval()
    g = torch.Generator().manual_seed(3)
    c, u = (torch.randn(1, 7, 12, generator=g, dtype=torch.float64) for _ in range(2))
    pooled = torch.randn(1, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]], dtype=torch.float64)
    cond = Conditioning.of(c, u, 2, added={"text_embeds": (torch.zeros_like(pooled), pooled), "time_ids": (ids, ids)})
    x, v = (torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    from diffusers import DDIMScheduler
    return unet, DDIMScheduler(prediction_type="epsilon"), cond, x, v


def test_sdxl_layout_shapes_and_plan(tiny_xl64):
    """The planner on SDXL's layout: no attention at the full latent grid (the first down block has none), so the
    largest map is the second down block's self-attention at half the side; estimates and plans as elsewhere."""
    unet, _, _, _, _ = tiny_xl64
    shapes = attention_shapes(unet, (16, 16), 7)
    assert max(s.queries for s in shapes) == 8 * 8  # down_blocks.1 / up_blocks.1; none at 16 x 16
    assert {(s.heads, s.queries, s.keys) for s in shapes} == {(2, 64, 64), (2, 64, 7), (4, 16, 16), (4, 16, 7)}
    # attn1 + attn2 per transformer block: down 1 + 1 x 2, mid 2, up 2 x 2 + 2 x 1 (an up block has one more layer)
    assert len(shapes) == 2 * (1 + 2 + 2 + 4 + 2)
    args = ((16, 16), 7, torch.float64, "cpu")
    whole = estimate_bytes(unet, 2, *args)
    assert plan_jvp(unet, 2, *args, budget=whole).unchanged
    chunked = plan_jvp(unet, 2, *args, budget=whole - 1)
    assert chunked.per_call == 2 and chunked.query_chunk is not None and chunked.estimate <= whole - 1


@pytest.mark.parametrize("memory", [JvpMemory(attention="chunked", query_chunk=24),   # 64 queries: 24 + 24 + 16
                                    JvpMemory(max_bytes=1, attention="auto")])         # 1 generation per call
def test_capped_jvp_on_the_sdxl_layout_equals_the_unchunked_jvp(tiny_xl64, memory):
    """With added conditions (text_embeds, time_ids) sliced with the rows, through the chunked attention of
    SDXL's transformer blocks; the unchunked JVP is torch.func.jvp of the pair call written out here."""
    unet, sched, emb, x, v = tiny_xl64
    t = 981

    def s_pair(z):  # [s(z, uncond); s(z, cond)] by a plain UNet call with added_cond_kwargs
        zz = torch.cat([z, z])
        added = {k: torch.cat(pair) for k, pair in emb.added.items()}
        eps = unet(zz, t, encoder_hidden_states=torch.cat([emb.uncond, emb.cond]), added_cond_kwargs=added).sample
        return -eps / (1 - sched.alphas_cumprod[t]).sqrt()

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        tangent = jvp(s_pair, (x,), (v,))[1]
    want = tangent[2:] - tangent[:2]
    model = denoiser(unet, sched, jvp_memory=memory)
    assert not model.jvp_plan(x, emb).unchanged
    got = model.hvp_delta(x, t, emb, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


# ------------------------------------------------------------------- joint-attention transformers (SD3, Flux)

def _tiny_sd3_64():
    """A toy SD3Transformer2DModel in float64 with SD3.5's extras (a dual-attention layer, RMS q/k norms), and
    (x, v) at 8 x 8 latents (16 image tokens), a 10-token context of width 48 and pooled (2, 32), 2 rows."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm").double().eval()
    g = torch.Generator().manual_seed(4)
    x, v = (torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kw = dict(encoder_hidden_states=torch.randn(2, 10, 48, generator=g, dtype=torch.float64),
              pooled_projections=torch.randn(2, 32, generator=g, dtype=torch.float64),
              timestep=torch.full((2,), 500.0, dtype=torch.float64))
    return model, x, v, kw, 10


def _tiny_flux_64():
    """A toy FluxTransformer2DModel in float64 (1 double- and 1 single-stream block, guidance embedding, rotary
    axes) and (x, v) of 8 x 8 VAE latents packed 2 x 2: (2, 16, 16) tokens; a 6-token context of width 24."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=12, guidance_embeds=True,
                                   axes_dims_rope=(2, 2, 4)).double().eval()
    g = torch.Generator().manual_seed(5)
    x, v = (torch.randn(2, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    kw = dict(encoder_hidden_states=torch.randn(2, 6, 24, generator=g, dtype=torch.float64),
              pooled_projections=torch.randn(2, 12, generator=g, dtype=torch.float64),
              timestep=torch.full((2,), 0.5, dtype=torch.float64), img_ids=ids.reshape(-1, 3).double(),
              txt_ids=torch.zeros(6, 3, dtype=torch.float64), guidance=torch.full((2,), 3.5, dtype=torch.float64))
    return model, x, v, kw, 6


@pytest.mark.parametrize("build", [_tiny_sd3_64, _tiny_flux_64], ids=["sd3", "flux"])
def test_joint_attention_jvp_chunked_equals_the_math_kernel_and_shapes_match_the_calls(build, monkeypatch):
    """The chunked processors (SD3's joint attention with a dual-attention layer; Flux's double- and single-stream
    blocks) give the math kernel's JVP; the attention shapes the planner reads from the config are exactly the
    ones the chunked processors are called with."""
    from utils.models.autodiff import forward_ad
    from utils.models.jvp_memory import chunked_attention, transformer_attention_shapes
    model, x, v, kw, ctx = build()

    def f(z):
        return model(hidden_states=z, return_dict=False, **kw)[0]
    with torch.no_grad(), forward_ad(x):
        want = jvp(f, (x,), (v,))
    calls, apply = [], ChunkedAttention.apply

    def spy(q, k, *rest):
        calls.append((q.shape[1], q.shape[2], k.shape[2]))
        return apply(q, k, *rest)
    monkeypatch.setattr(ChunkedAttention, "apply", spy)
    before = dict(model.attn_processors)
    with torch.no_grad(), forward_ad(x), chunked_attention(model, 5):
        got = jvp(f, (x,), (v,))
        calls.clear()  # (functorch's jvp re-enters Function.apply: count the layers in a plain forward)
        f(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max().item())
    assert all(model.attn_processors[k] is p for k, p in before.items())
    shapes = transformer_attention_shapes(model, (8, 8), ctx)  # 8 x 8 latents: 16 image tokens for both
    assert sorted(calls) == sorted((s.heads, s.queries, s.keys) for s in shapes)
    assert len({c[1] for c in calls}) == (2 if build is _tiny_sd3_64 else 1)  # SD3.5's dual layer: image only


def test_transformer_estimate_is_the_documented_formula_and_plans():
    from utils.models.jvp_memory import ACT_TOKENS, CHUNK_MAPS, MATH_MAPS, WEIGHT_COPIES_TOKENS
    model, _, _, _, ctx = _tiny_sd3_64()
    hw, tokens, width = (8, 8), 16 + 10, 16
    weight = max(p.numel() for p in model.parameters())
    for dtype, b in ((torch.float32, 4), (torch.bfloat16, 2)):
        fixed = ACT_TOKENS["sd3"] * 6 * tokens * width * b + WEIGHT_COPIES_TOKENS * weight * b
        assert estimate_bytes(model, 3, hw, ctx, dtype, "cpu") == int(fixed + MATH_MAPS * 6 * 2 * tokens ** 2 * 4)
        assert estimate_bytes(model, 3, hw, ctx, dtype, "cpu", 8) == int(fixed + CHUNK_MAPS * 6 * 2 * 8 * tokens * 4)
    whole = estimate_bytes(model, 3, hw, ctx, torch.float32, "cpu")
    assert plan_jvp(model, 3, hw, ctx, torch.float32, "cpu", whole).unchanged
    chunked = plan_jvp(model, 3, hw, ctx, torch.float32, "cpu", whole - 1)
    assert chunked.per_call == 3 and chunked.query_chunk == tokens  # one chunk of all 26 queries already fits
    assert plan_jvp(model, 3, hw, ctx, torch.float32, "cpu", 1).per_call == 1
    from diffusers.models.attention_processor import AttnProcessor2_0
    from utils.models.jvp_memory import chunked_attention
    model.set_attn_processor(AttnProcessor2_0())  # not the joint processor the chunked one mirrors: refused
    with pytest.raises(ValueError, match="JointAttnProcessor2_0"), chunked_attention(model, 8):
        pass


def test_published_flow_shapes_on_the_meta_device():
    """SD3-medium's and Flux-dev's transformers from benchmarks/flow_shape.py's configs, built without memory:
    the parameter counts of the published models (2,028,328,000 and 11,901,408,320), and the planner's token
    counts at 1024 x 1024 (4096 image tokens: SD3's 2 x 2 patches, Flux's 2 x 2 packing)."""
    from benchmarks.flow_shape import PUBLISHED_PARAMETERS, flow_transformer, parameter_count
    from utils.models.jvp_memory import image_tokens
    counts = {k: flow_transformer(k, "meta") for k in ("sd3_medium", "flux_dev")}
    assert {k: parameter_count(m) for k, m in counts.items()} == {"sd3_medium": 2_028_328_000,
                                                                   "flux_dev": 11_901_408_320}
    for k, m in counts.items():
        assert abs(parameter_count(m) / PUBLISHED_PARAMETERS[k] - 1) < 0.005
        assert image_tokens(m, (128, 128)) == 4096
        assert len(attention_shapes(m, (128, 128), 333)) == {"sd3_medium": 24, "flux_dev": 19 + 38}[k]


def test_a_cap_on_packed_latents_is_refused_and_flux_is_planned():
    """Flux's transformer is planned at run time because its denoiser keeps the latents unpacked (B, C, h, w) and
    packs them per call; a flow denoiser handed packed tokens (B, N, 64) will not guess their latent grid. A
    transformer the planner does not model is refused by flow_options."""
    from types import SimpleNamespace
    from diffusers import FlowMatchEulerDiscreteScheduler
    from utils.cli import UserError
    from utils.models.flow import FlowDenoiser
    from utils.startup import flow_options
    flux, x, _, _, _ = _tiny_flux_64()
    model = SimpleNamespace(family=SimpleNamespace(prediction_type="flow", backbone=lambda pipe: pipe), pipe=flux,
                            model_id="tiny-flux")
    assert flow_options(model, "velocity", jvp_capped=True) == {"flow_space": "velocity"}
    other = SimpleNamespace(family=model.family, pipe=torch.nn.Linear(2, 2), model_id="x")
    with pytest.raises(UserError, match="Linear"):
        flow_options(other, "velocity", jvp_capped=True)
    with pytest.raises(ValueError, match="packed"):
        FlowDenoiser(flux, FlowMatchEulerDiscreteScheduler(), jvp_memory=JvpMemory(1)).jvp_plan(x, None)
