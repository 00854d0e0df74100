"""Cross-attention instrument (utils/attention.py): bit-identity, recorded probabilities against independent math,
Ren's edit, processor restoration, layer naming, and the LE / AE / BE scores against small numpy versions."""
import copy
import math

import numpy as np
import pytest
import torch

from utils.models.attention import (CrossAttentionInstrument, QueryMapRequest, RenEdit, TokenRequest, ae_score,
    be_mask, be_step_score, cross_attention_layers, entropy, le_score, prompt_lengths, select_layers,
    summary_entropy)
from utils.models.autodiff import forward_ad

K = 77


@pytest.fixture(scope="module")
def pipe():
    from utils.demo.model import tiny_pipeline
    return tiny_pipeline()


@pytest.fixture(scope="module")
def unet(pipe):
    return pipe.unet.eval()


@pytest.fixture(scope="module")
def sd1_unet():
    """SD v1's block layout at toy size: 3 cross-attention down blocks x 2, mid, 3 cross-attention up blocks x 3."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16,) * 4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16, attention_head_dim=8,
        norm_num_groups=8).eval()


def _inputs(unet, n=2, seed=0):
    """[uncond; cond] inputs for 2n rows: latents (2n, C, H, W), timestep, embeddings (2n, 77, D)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    emb = torch.randn(2 * n, K, cfg.cross_attention_dim, generator=g)
    return torch.cat([x, x]), torch.tensor(500), emb


def _run(unet, x, t, emb):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


def _capture(unet, path):
    """Forward pre-hook + hook on one attention module: its (hidden_states, encoder_hidden_states) and output."""
    seen = {}
    module = unet.get_submodule(path)

    def pre(_, args, kwargs):
        seen["x"], seen["ctx"] = args[0].detach().clone(), kwargs["encoder_hidden_states"].detach().clone()

    def post(_, args, kwargs, out):
        seen["out"] = out.detach().clone()

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               module.register_forward_hook(post, with_kwargs=True)]
    return seen, module, handles


def _independent_logits(module, x, ctx):
    """z = Q K^T / sqrt(d) (B, heads, N, K) in float64 from the module's own to_q / to_k weights."""
    q = x.double() @ module.to_q.weight.double().T
    k = ctx.double() @ module.to_k.weight.double().T
    split = lambda t: t.view(t.shape[0], t.shape[1], module.heads, -1).transpose(1, 2)  # noqa: E731
    q, k = split(q), split(k)
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def test_installed_idle_and_recording_are_bit_identical(unet):
    x, t, emb = _inputs(unet)
    ref = _run(unet, x, t, emb)
    with CrossAttentionInstrument(unet) as inst:  # installed, nothing requested
        assert torch.equal(_run(unet, x, t, emb), ref)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(), query_map=QueryMapRequest(3), branch="all") as inst:
        inst.step = 0
        assert torch.equal(_run(unet, x, t, emb), ref)
        with inst.paused():
            inst.step = 1
            assert torch.equal(_run(unet, x, t, emb), ref)
    assert set(inst.token_dists) == set(inst.query_maps) == {(0, l.index) for l in inst.layers}
    assert all(v.dtype == torch.float32 and v.shape == (4, K) for v in inst.token_dists.values())


def test_jvp_runs_through_a_paused_instrument(unet):
    x, t, emb = _inputs(unet, n=1)
    v = torch.randn_like(x[:1])
    f = lambda z: unet(torch.cat([z, z]), t, encoder_hidden_states=emb, return_dict=False)[0]  # noqa: E731
    with forward_ad(x):
        ref = torch.func.jvp(f, (x[:1],), (v,))[1]
        with CrossAttentionInstrument(unet, tokens=TokenRequest()) as inst, inst.paused():
            got = torch.func.jvp(f, (x[:1],), (v,))[1]
    assert torch.equal(got, ref) and not inst.token_dists


def test_bfloat16_output_identical_and_recorded_in_float32(unet):
    unet = copy.deepcopy(unet).to(torch.bfloat16)
    x, t, emb = _inputs(unet)
    x, emb = x.bfloat16(), emb.bfloat16()
    ref = _run(unet, x, t, emb)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(steps=[0])) as inst:
        inst.step = 0
        assert torch.equal(_run(unet, x, t, emb), ref)
    dists = torch.stack(list(inst.token_dists.values()))
    assert dists.dtype == torch.float32 and torch.allclose(dists.sum(-1), torch.ones(()), atol=1e-5)


def test_recorded_probabilities_match_independent_softmax(unet):
    n = 2
    x, t, emb = _inputs(unet, n=n)
    layer = cross_attention_layers(unet)[2]
    seen, module, handles = _capture(unet, layer.path)
    token = [5, 9]  # one index per cond row
    try:
        with CrossAttentionInstrument(unet, tokens=TokenRequest(layers=[layer.name]),
                                      query_map=QueryMapRequest(token, layers=[2])) as inst:
            inst.step = 7
            _run(unet, x, t, emb)
    finally:
        for h in handles:
            h.remove()
    p = _independent_logits(module, seen["x"], seen["ctx"]).softmax(-1)[n:]  # cond rows (n, heads, N, K)
    assert set(inst.token_dists) == {(7, 2)}
    torch.testing.assert_close(inst.token_dists[(7, 2)].double(), p.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    want_map = torch.stack([p[r, :, :, token[r]].mean(0) for r in range(n)])  # (n, N)
    assert inst.query_maps[(7, 2)].shape == (n, 64)
    torch.testing.assert_close(inst.query_maps[(7, 2)].double(), want_map, rtol=1e-5, atol=1e-6)


def test_edit_with_factor_one_and_no_mask_equals_plain_attention(unet):
    x, t, emb = _inputs(unet)
    ref = _run(unet, x, t, emb)
    with CrossAttentionInstrument(unet, edit=RenEdit(keep_len=None, factor=1.0)):
        got = _run(unet, x, t, emb)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_edit_changes_exactly_the_chosen_tokens(unet):
    n, c, keep = 2, 1.7, [4, 6]  # per prompt: BOS + prompt tokens + first EOS
    x, t, emb = _inputs(unet, n=n)
    layer = cross_attention_layers(unet)[0]
    with CrossAttentionInstrument(unet, tokens=TokenRequest(), branch="all") as plain:
        plain.step = 0
        _run(unet, x, t, emb)
    seen, module, handles = _capture(unet, layer.path)
    try:
        with CrossAttentionInstrument(unet, tokens=TokenRequest(), edit=RenEdit(keep, factor=c), branch="all") as ed:
            ed.step = 0
            out = _run(unet, x, t, emb)
    finally:
        for h in handles:
            h.remove()
    assert not torch.allclose(out, _run(unet, x, t, emb))
    got, before = ed.token_dists[(0, 0)], plain.token_dists[(0, 0)]
    for row in range(2 * n):  # uncond row r and cond row n + r share prompt r's mask
        assert (got[row, keep[row % n]:] == 0).all() and (got[row, :keep[row % n]] > 0).all()
        assert (before[row] > 0).all()
    # Independent edit: cond rows (n..2n-1, not Ren's odd indices) get BOS logit x c; positions >= keep -> -inf.
    z = _independent_logits(module, seen["x"], seen["ctx"])
    z[n:, :, :, 0] *= c
    for row in range(2 * n):
        z[row, :, :, keep[row % n]:] = -math.inf
    p = z.softmax(-1)
    torch.testing.assert_close(got.double(), p.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    # The edited layer's output is softmax(z) V through to_out.
    v = (seen["ctx"].double() @ module.to_v.weight.double().T).view(2 * n, K, module.heads, -1).transpose(1, 2)
    o = (p @ v).transpose(1, 2).flatten(2)
    o = o @ module.to_out[0].weight.double().T + module.to_out[0].bias.double()
    torch.testing.assert_close(seen["out"].double(), o, rtol=1e-4, atol=1e-5)
    # Uncond rows: the mask only, i.e. the plain probabilities renormalized over the kept tokens (per query).
    z_plain = _independent_logits(module, seen["x"], seen["ctx"])
    for row in range(n):
        q = z_plain[row, :, :, :keep[row]].softmax(-1).mean(dim=(0, 1))
        torch.testing.assert_close(got[row, :keep[row]].double(), q, rtol=1e-5, atol=1e-6)


def test_edit_factor_only_scales_cond_rows_for_any_n(unet):
    n = 3
    x, t, emb = _inputs(unet, n=n)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(layers=[0]), branch="all") as plain:
        plain.step = 0
        _run(unet, x, t, emb)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(layers=[0]), branch="all",
                                  edit=RenEdit(keep_len=None, factor=2.0)) as ed:
        ed.step = 0
        _run(unet, x, t, emb)
    a, b = plain.token_dists[(0, 0)], ed.token_dists[(0, 0)]
    torch.testing.assert_close(b[:n], a[:n], rtol=1e-5, atol=1e-7)  # uncond rows untouched
    assert ((b[n:] - a[n:]).abs().amax(-1) > 1e-4).all()  # every cond row changed


def test_drop_first_eos_masks_one_more_token(unet):
    x, t, emb = _inputs(unet, n=1)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(layers=[1]), branch="all",
                                  edit=RenEdit(5, factor=1.0, drop_first_eos=True)) as inst:
        inst.step = 0
        _run(unet, x, t, emb)
    p = inst.token_dists[(0, 1)]
    assert (p[:, 4:] == 0).all() and (p[:, :4] > 0).all()


def test_processors_restored_also_after_an_exception(unet):
    before = dict(unet.attn_processors)
    with CrossAttentionInstrument(unet, tokens=TokenRequest()):
        inside = unet.attn_processors
        for name, proc in inside.items():
            assert (proc is before[name]) == ("attn2" not in name)  # only cross-attention is wrapped
    assert all(p is before[k] for k, p in unet.attn_processors.items())
    with pytest.raises(KeyError, match="boom"):
        with CrossAttentionInstrument(unet, edit=RenEdit(4)):
            raise KeyError("boom")
    after = unet.attn_processors
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


def test_recording_guards(unet):
    x, t, emb = _inputs(unet, n=1)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(steps=[1])) as inst:
        with pytest.raises(RuntimeError, match="inst.step"):
            _run(unet, x, t, emb)
    with CrossAttentionInstrument(unet, tokens=TokenRequest(steps=[1])) as inst:
        inst.step = 0
        _run(unet, x, t, emb)  # step not requested: nothing stored
        assert not inst.token_dists
        inst.step = 1
        _run(unet, x, t, emb)
        with pytest.raises(RuntimeError, match="already recorded"):
            _run(unet, x, t, emb)
    assert inst.step is None


def test_bad_layer_index_or_name_raises(unet):
    layers = cross_attention_layers(unet)
    for bad in (len(layers), -1, "down_blocks.9.attn2", [0, 99]):
        with pytest.raises(ValueError, match="valid forward indices 0..3"):
            select_layers(layers, bad)
    with pytest.raises(ValueError, match="mid_block.attentions.0.transformer_blocks.0.attn2.processor"):
        CrossAttentionInstrument(unet, tokens=TokenRequest(layers=[7]))
    assert select_layers(layers, "mid_block.attentions.0.transformer_blocks.0.attn2")[0].index == 1
    with pytest.raises(ValueError, match="branch"):
        CrossAttentionInstrument(unet, branch="odd")


def test_forward_order_differs_from_registration_order(unet, sd1_unet):
    tiny = [l.path.split(".attentions")[0] for l in cross_attention_layers(unet)]
    assert tiny == ["down_blocks.0", "mid_block", "up_blocks.1", "up_blocks.1"]
    registered = [k for k in sd1_unet.attn_processors if "attn2" in k]
    assert registered[-1].startswith("mid_block")  # diffusers registers up_blocks before mid_block
    layers = cross_attention_layers(sd1_unet)
    assert [l.index for l in layers] == list(range(16))
    assert sorted(l.name for l in layers) == sorted(registered)
    assert layers[3].path == "down_blocks.1.attentions.1.transformer_blocks.0.attn2"  # Ren's LE layer
    assert layers[6].path == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert [l.path.split(".transformer")[0] for l in layers[:2]] == ["down_blocks.0.attentions.0",
                                                                   "down_blocks.0.attentions.1"]  # BE layers
    assert [l.resolution[0] for l in layers] == [8, 8, 4, 4, 2, 2, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8]


def test_prompt_lengths_count_bos_and_first_eos(pipe):
    assert prompt_lengths(pipe.tokenizer, ["a cat", "", "word " * 100]) == [4, 2, 77]


# ---- scores -----------------------------------------------------------------------------------------------------

def _np_entropy(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def _random_dists(rng, shape):
    p = rng.random(shape) ** 4  # skewed, some tiny
    return p / p.sum(-1, keepdims=True)


def test_entropy_hand_cases_and_random():
    assert entropy(torch.full((K,), 1 / K, dtype=torch.float64)).item() == pytest.approx(math.log(K), rel=1e-12)
    one_hot = torch.zeros(K)
    one_hot[0] = 1
    assert entropy(one_hot).item() == 0.0  # 0 ln 0 = 0, no NaN
    assert entropy(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(math.log(2))
    p = _random_dists(np.random.default_rng(0), (5, K))
    np.testing.assert_allclose(entropy(p).numpy(), _np_entropy(p), rtol=1e-12)
    s = summary_entropy(p, [3, 10, 76, 0, 40]).numpy()
    np.testing.assert_allclose(s, [_np_entropy(p[i, j:]) for i, j in enumerate([3, 10, 76, 0, 40])], rtol=1e-12)
    assert summary_entropy(torch.full((1, K), 1 / K), 76).item() == pytest.approx(math.log(K) / K)


def _ren_layout(rng, steps=50, rows=3, layers=16, heads=8):
    """Recorded data in Ren's layout (steps, rows, layers, heads, K) and as this module stores it."""
    a = _random_dists(rng, (steps, rows, layers, heads, K))
    dists = {(s, l): torch.tensor(a[s, :, l].mean(1), dtype=torch.float32) for s in range(steps) for l in range(layers)}
    return a, dists


def test_le_score_against_numpy():
    a, dists = _ren_layout(np.random.default_rng(1))
    expected = _np_entropy(a[0, :, 3].mean(1))  # step 0, layer 3, head mean
    np.testing.assert_allclose(le_score(dists).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(le_score(dists, layer=5, step=2).numpy(), _np_entropy(a[2, :, 5].mean(1)), rtol=1e-6)


def test_ae_score_against_numpy():
    a, dists = _ren_layout(np.random.default_rng(2))
    length = np.array([5, 12, 77])  # L = BOS + prompt + first EOS; summary tokens from L - 1
    p = a.mean(axis=(2, 3))  # (steps, rows, K): mean over layers and heads, as Ren's detect.py mode "D"
    h = _np_entropy(p)
    pad = np.stack([[_np_entropy(p[s, i, length[i] - 1:]) for i in range(3)] for s in range(50)])
    expected = h[40:50].mean(0) + pad[40:50].mean(0) - pad[0]
    np.testing.assert_allclose(ae_score(dists, 50, length - 1).numpy(), expected, rtol=1e-6)
    # Hand case: uniform everywhere -> H = ln 77 and the summary term cancels.
    flat = {(s, l): torch.full((1, K), 1 / K) for s in range(10) for l in range(2)}
    assert ae_score(flat, 10, 4).item() == pytest.approx(math.log(K), rel=1e-6)


def test_be_against_numpy():
    rng = np.random.default_rng(3)
    n, c, h, w = 2, 4, 8, 8
    maps = {(49, l): torch.tensor(rng.random((n, h * w)), dtype=torch.float32) for l in range(3)}
    m = be_mask(maps, 49)
    np.testing.assert_allclose(m.numpy(), (maps[(49, 0)].numpy() + maps[(49, 1)].numpy()) / 2, rtol=1e-7)
    d = rng.standard_normal((n, c, h, w))
    mm = m.numpy().reshape(n, 1, h, w)
    expected = np.sqrt(((mm * d) ** 2).sum(axis=(1, 2, 3))) / mm.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(be_step_score(m, d).numpy(), expected, rtol=1e-12)
    # Hand case: a constant mask k gives ||k d|| / k = ||d||.
    const = torch.full((n, h * w), 0.3)
    np.testing.assert_allclose(be_step_score(const, d).numpy(), np.sqrt((d ** 2).sum(axis=(1, 2, 3))), rtol=1e-6)
    # A mask at half the latent grid (SDXL's mask layers): each query's value covers its 2 x 2 latent patch.
    coarse = rng.random((n, h // 2, w // 2))
    up = np.kron(coarse, np.ones((2, 2))).reshape(n, 1, h, w)
    expected = np.sqrt(((up * d) ** 2).sum(axis=(1, 2, 3))) / up.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(be_step_score(torch.tensor(coarse.reshape(n, -1)), d).numpy(), expected, rtol=1e-12)
    for bad in (torch.ones(n, 24), torch.ones(n, 128), torch.ones(n + 1, h * w)):
        with pytest.raises(ValueError, match="mask shape"):
            be_step_score(bad, d)


def test_pipeline_run_gives_finite_scores(pipe):
    """End to end: record during a 5-step tiny pipeline run (one UNet call per step) and score."""
    steps, prompts = 5, ["a photo of a cat"]
    length = prompt_lengths(pipe.tokenizer, prompts)
    with CrossAttentionInstrument(pipe.unet, tokens=TokenRequest(),
                                  query_map=QueryMapRequest([L - 1 for L in length], steps=[steps - 1])) as inst:
        inst.step = 0

        def advance(_, i, __, kwargs):
            inst.step = i + 1
            return {}

        pipe(prompts, num_inference_steps=steps, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=advance)
    assert {s for s, _ in inst.token_dists} == set(range(steps))
    scores = [le_score(inst.token_dists, layer=0), ae_score(inst.token_dists, steps, [L - 1 for L in length]),
              be_step_score(be_mask(inst.query_maps, steps - 1, layers=(0, 2)), torch.randn(1, 4, 8, 8))]
    assert all(s.shape == (1,) and torch.isfinite(s).all() for s in scores)
