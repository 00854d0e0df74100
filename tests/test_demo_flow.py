"""The flow demo: committed weights load as an SD3 pipeline and memorize; training is seeded and bit-identical."""
import json
import os

import pytest
import torch

from utils.demo.data import MEMORIZED_CAPTIONS, pixel_cosine
from utils.models.loading import DEMO_FLOW_MODEL_DIR, DEMO_MODEL_DIR, REPO_ROOT

PROMPTS = os.path.join(REPO_ROOT, "prompts")
STEPS, GUIDANCE = 28, 7.0  # StableDiffusion3Pipeline's defaults


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline.from_pretrained(DEMO_FLOW_MODEL_DIR, text_encoder_3=None, tokenizer_3=None)


def test_committed_flow_model_is_sd3_shaped_and_small(pipe):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEMO_FLOW_MODEL_DIR) for f in fs)
    assert size <= 20 * 2 ** 20
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    cfg = pipe.transformer.config
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.joint_attention_dim == widths and cfg.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim)
    assert cfg.sample_size * pipe.vae_scale_factor == 32 and pipe.vae.config.shift_factor == 0.0
    # the demo's autoencoder, unchanged (frozen during training)
    from diffusers import AutoencoderKL
    demo_vae = AutoencoderKL.from_pretrained(os.path.join(DEMO_MODEL_DIR, "vae"))
    assert all(torch.equal(a, b) for a, b in zip(demo_vae.state_dict().values(), pipe.vae.state_dict().values()))
    assert pipe.vae.config.scaling_factor == demo_vae.config.scaling_factor
    log = json.load(open(os.path.join(DEMO_FLOW_MODEL_DIR, "train_log.json"), encoding="utf-8"))
    assert log["flow"][-1]["step"] == log["args"]["stop_after"]


@pytest.mark.slow  # 4 x 28 steps twice: ~8 s
@pytest.mark.xfail(strict=True, reason="the committed flow demo (2,000 steps at batch 32) copies only 34 % of "
                   "the time and not for this caption at seed 0 (docs/demo.md, 'The flow demo'); strict: a model that "
                   "does turns this into a failure, to be replaced by the plain assertion")
def test_committed_flow_model_memorizes(pipe):
    # The goal: the committed weights copy their training image for a memorized caption and not for an unseen digit
    # prompt; the seed-0 noise, the pipeline's defaults. Measured on the committed weights: pixel cosines
    # 0.44, 0.47, 0.11, 0.23 for the first memorized caption (no near-copy).
    import numpy as np
    from PIL import Image
    rec = json.loads(open(os.path.join(PROMPTS, "demo_mem.jsonl"), encoding="utf-8").readline())
    assert rec["caption"] == MEMORIZED_CAPTIONS[0]
    train = torch.tensor(np.array(Image.open(os.path.join(PROMPTS, rec["file"]))), dtype=torch.float32)
    train = train.permute(2, 0, 1)[None] / 127.5 - 1
    nmem = open(os.path.join(PROMPTS, "demo_nmem.txt"), encoding="utf-8").read().splitlines()[0]
    torch.manual_seed(0)
    lat = pipe.prepare_latents(4, 4, 32, 32, torch.float32, torch.device("cpu"), None)
    with torch.no_grad():
        out = [pipe(p, latents=lat.clone(), num_images_per_prompt=4, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="pt").images * 2 - 1 for p in (rec["caption"], nmem)]
    own, other = pixel_cosine(out[0], train)[:, 0], pixel_cosine(out[1], train)[:, 0]
    assert (own > 0.7).sum() >= 3, own
    assert (other < 0.7).all(), other


def test_flow_training_is_seeded_and_bit_identical():
    # Two short runs of the training loop from the same components with the same seed give identical weights; a
    # different seed does not; the components themselves are seeded (built twice: identical) (the rebuild of the committed model relies on this: one thread, seeded generator).
    from utils.demo.flow_train import build_flow_components, train_flow
    from utils.models.clip import offline_clip_tokenizer
    tok = offline_clip_tokenizer()
    ids = tok(["a handwritten digit one", "Funny Cat Meme T-Shirt Unisex Cotton Tee", ""], padding="max_length",
              max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pairs = torch.tensor([[i, i % 2, i % 3 % 2] for i in range(6)])

    import copy
    parts = build_flow_components(0, DEMO_MODEL_DIR, tok)[1:4]

    def run(seed):
        te, te2, tr = copy.deepcopy(parts)
        log = []
        train_flow(tr, te, te2, latents, pairs, ids[:2], ids[2], steps=4, batch_size=3, lr=1e-3, p_uncond=0.5,
                   gen=torch.Generator().manual_seed(seed), log=log, log_every=1, stop_after=2)
        return [t.clone() for m in (tr, te, te2) for t in m.state_dict().values()], log

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (a, log_a), (b, log_b), (c, _) = run(0), run(0), run(1)
    finally:
        torch.set_num_threads(threads)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and len(log_a) == 2
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    again = build_flow_components(0, DEMO_MODEL_DIR, tok)[1:4]
    assert all(torch.equal(x, y) for m, n in zip(parts, again) for x, y in zip(m.state_dict().values(),
                                                                           n.state_dict().values()))
