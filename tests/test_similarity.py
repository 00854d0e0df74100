"""SSCD, pixel cosine and CLIP score with stand-in models whose embeddings are known by hand."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from utils.evaluation import similarity as S
from utils.models.clip import load_clip, load_sscd
from utils.cli import UserError


class MeanColour(torch.nn.Module):
    """Stand-in descriptor: the mean of each input channel, (B, 3). After the 0.5/0.5 normalization a solid
    colour (r, g, b) in 0..255 becomes (2r/255 - 1, 2g/255 - 1, 2b/255 - 1)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def solid(rgb, size=(300, 260)):
    return Image.new("RGB", size, rgb)


def gradient(size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def scripted(tmp_path):
    import warnings
    path = tmp_path / "mean_colour.torchscript.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format SSCD ships in
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(MeanColour()).save(str(path))
    return str(path)


RED, YELLOW, CYAN = (255, 0, 0), (255, 255, 0), (0, 255, 255)


def test_sscd_known_cosines_and_max_over_ground_truth(scripted):
    model, prep = load_sscd(scripted), S.sscd_transform("center224")
    d = S.sscd_descriptors(model, prep, [solid(RED), solid(YELLOW), solid(CYAN)], batch_size=2)
    assert torch.allclose(d * math.sqrt(3), torch.tensor([[1., -1, -1], [1, 1, -1], [-1, 1, 1]]), atol=1e-6)
    gen = S.sscd_descriptors(model, prep, [solid(RED), solid(YELLOW)])
    gt = S.sscd_descriptors(model, prep, [solid(CYAN), solid(YELLOW)])
    # red vs {cyan: -1, yellow: 1/3} -> 1/3; yellow vs {cyan: -1/3, yellow: 1} -> 1
    assert S.max_similarity(gen, gt).tolist() == pytest.approx([1 / 3, 1.0], abs=1e-6)
    assert S.max_similarity(gen, gt[:1]).tolist() == pytest.approx([-1.0, -1 / 3], abs=1e-6)


def test_sscd_identical_images_score_one_and_presets(scripted):
    model = load_sscd(scripted)
    ims = [gradient(seed=1), gradient(size=(64, 120), seed=2)]
    for preset in S.SSCD_PRESETS:
        d = S.sscd_descriptors(model, S.sscd_transform(preset), ims + [ims[0].copy()])
        assert S.max_similarity(d[2:], d[:1]).item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-6)
    # sscd288 keeps the aspect ratio: shapes differ, so images run one by one and give the same as alone.
    prep = S.sscd_transform("sscd288")
    assert prep(ims[0]).shape[1:] != prep(ims[1]).shape[1:]
    both = S.sscd_descriptors(model, prep, ims)
    alone = torch.cat([S.sscd_descriptors(model, prep, [im]) for im in ims])
    assert torch.allclose(both, alone)
    # The default preset is the issue's: Resize 256, CenterCrop 224, mean = std = 0.5.
    x = S.sscd_transform()(solid(RED, size=(500, 300)))
    assert x.shape == (3, 224, 224) and x[:, 0, 0].tolist() == pytest.approx([1, -1, -1])


def test_sscd_bad_files(tmp_path):
    with pytest.raises(UserError, match="dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large"):
        load_sscd(str(tmp_path / "absent.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a TorchScript model"):
        load_sscd(str(junk))


def test_pixel_cosine_analytic_values():
    a = gradient(size=(64, 64), seed=3)
    arr = np.asarray(a).astype(np.int16)
    inverted = Image.fromarray((255 - arr).astype(np.uint8))
    darker = Image.fromarray((arr // 2 + 20).astype(np.uint8))  # affine (up to the integer division)
    v = S.pixel_vectors([a, a.copy(), inverted, solid((7, 7, 7), size=(64, 64)), darker], size=64)
    assert v.dtype == torch.float64 and v.shape == (5, 3 * 64 * 64)
    sims = (v @ v[0]).tolist()
    assert sims[1] == pytest.approx(1.0, abs=1e-12)
    assert sims[2] == pytest.approx(-1.0, abs=1e-12)  # mean-centring makes inversion exactly -1
    assert sims[3] == 0.0 and v[3].abs().sum() == 0  # a single colour carries no pattern
    assert 0.99 < sims[4] < 1.0
    # Resizing happens in float, so a brightness offset survives it exactly (cosine 1 at another size).
    big = a.resize((128, 128), Image.NEAREST)
    brighter = Image.fromarray(np.clip(np.asarray(big).astype(np.int16) // 2 + 60, 0, 255).astype(np.uint8))
    halved = Image.fromarray((np.asarray(big) // 2).astype(np.uint8))
    w = S.pixel_vectors([halved, brighter], size=32)
    assert (w[0] @ w[1]).item() == pytest.approx(1.0, abs=1e-12)


class FakeClip:
    """Stand-in CLIP: image embedding = mean colour after 0.5/0.5 normalization; text embedding = a table row."""
    TABLE = {"red": [1., -1, -1], "yellow": [1., 1, -1], "cyan": [-1., 1, 1]}

    def encode_image(self, x):
        return x.mean(dim=(2, 3)) * 7.0  # the scale must not matter

    def encode_text(self, ids):
        return torch.tensor([list(self.TABLE.values())[i] for i in ids[:, 0].tolist()]) * 3.0


def fake_tokenizer(texts):
    return torch.tensor([[list(FakeClip.TABLE).index(t), 0] for t in texts])


def test_clip_scores_known_cosines():
    prep = S.sscd_transform("center224")
    ims = [solid(RED), solid(RED), solid(YELLOW), solid(CYAN)]
    s = S.clip_scores(FakeClip(), prep, fake_tokenizer, ims, ["red", "yellow", "yellow", "red"])
    assert s.tolist() == pytest.approx([1.0, 1 / 3, 1.0, -1.0], abs=1e-6)
    assert S.clip_scores(FakeClip(), prep, fake_tokenizer, [], []).numel() == 0


def test_clip_with_tiny_open_clip_model(tmp_path):
    """A real open_clip architecture (tiny config, random weights): clip_scores equals the direct computation."""
    import json

    import open_clip
    from open_clip import factory
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (tmp_path / "memsharp-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    try:
        torch.manual_seed(0)
        model, prep, tok = load_clip("memsharp-tiny-clip", None)
        ims = [gradient(seed=4), gradient(seed=5), gradient(seed=4)]
        texts = ["a red rug", "a blue rug by andover mills", "a red rug"]
        s = S.clip_scores(model, prep, tok, ims, texts, batch_size=2)
        with torch.no_grad():
            e_i = torch.nn.functional.normalize(model.encode_image(torch.stack([prep(im) for im in ims])), dim=-1)
            e_t = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
        assert s.tolist() == pytest.approx((e_i * e_t).sum(-1).tolist(), abs=1e-5)
        assert s[0].item() == pytest.approx(s[2].item(), abs=1e-6)  # same image, same text
    finally:
        factory._MODEL_CONFIG_PATHS.remove(tmp_path)
        factory._rescan_model_configs()


def test_load_clip_errors(tmp_path):
    with pytest.raises(UserError, match="unknown CLIP model 'ViT-H-15'.*ViT-H-14"):
        load_clip("ViT-H-15", "laion2b_s32b_b79k")
    with pytest.raises(UserError, match="no pretrained weights 'nope'.*laion2b_s32b_b79k"):
        load_clip("ViT-H-14", "nope")
    import time
    t = time.monotonic()
    with pytest.raises(UserError, match="not in the local cache and this machine is offline"):
        load_clip("ViT-H-14", "laion2b_s32b_b79k", cache_dir=str(tmp_path), offline=True)
    assert time.monotonic() - t < 5  # fails fast, builds nothing


def test_summarize():
    s = S.summarize([0.2, 0.6, 0.8, 0.4], [0.4, 0.6], [0.3], thresholds=(0.5, 0.7))
    assert s == {"mean_similarity": 0.5, "mean_similarity_over_images": 0.5, "n_images_with_gt": 4,
                 "frac_above_0.5": 0.5, "frac_above_0.7": 0.25, "mean_clip": 0.3}
    assert S.summarize([], [], [])["mean_similarity"] is None
