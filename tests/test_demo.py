"""The bundled demo model: committed weights load and memorize, training runs end to end, benchmark files agree."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.demo.data import DIGIT_NAMES, MEMORIZED_CAPTIONS, TRAIN_TEMPLATES, build_dataset, pixel_cosine, to_pil
from utils.models.loading import DEMO_MODEL_DIR, REPO_ROOT
from utils.models.families import SD1

PROMPTS = os.path.join(REPO_ROOT, "prompts")


@pytest.fixture(scope="module")
def data():
    return build_dataset(seed=0)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(DEMO_MODEL_DIR)


def test_committed_model_is_sd_shaped_and_small(pipe):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEMO_MODEL_DIR) for f in fs)
    assert size <= 20 * 2 ** 20
    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    assert (cfg.prediction_type, cfg.steps_offset, cfg.clip_sample, cfg.set_alpha_to_one) == ("epsilon", 1, False, False)
    assert pipe.tokenizer.vocab_size == 49408 and pipe.tokenizer.model_max_length == 77
    # the real CLIP BPE: known ids of common words
    assert pipe.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


def test_committed_model_memorizes(pipe, data):
    # The committed weights copy their training image for memorized captions and not for an unseen digit prompt
    # (README table: 90.6 % vs 7.8 % over all prompts; here one of each, the seeded noise of the benchmark runs).
    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    lat = SD1.initial_latents(pipe, 4, seed=42)
    nmem = open(os.path.join(PROMPTS, "demo_nmem.txt"), encoding="utf-8").read().splitlines()[0]
    with torch.no_grad():
        out = [pipe(p, latents=lat.clone(), num_images_per_prompt=4, num_inference_steps=50, guidance_scale=7.5,
                    output_type="pt").images * 2 - 1 for p in (MEMORIZED_CAPTIONS[0], nmem)]
    memorized = data["images"][[k for _, k in data["memorized"]]]
    own = pixel_cosine(out[0], memorized[:1])[:, 0]
    nearest = pixel_cosine(out[1], memorized).max(dim=1).values
    assert (own > 0.7).sum() >= 3, own
    assert (nearest < 0.7).all(), nearest


def test_smoke_training_writes_a_loadable_pipeline(tmp_path):
    import train_demo
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "model"
    train_demo.main(["--smoke", "--out_dir", str(out), "--prompts_dir", str(tmp_path / "prompts")])
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log["vae"]] == [0, 1, 2] and log["unet"][-1]["step"] == 3
    assert all(np.isfinite(r["loss"]) for r in log["unet"])
    p = StableDiffusionPipeline.from_pretrained(str(out))
    assert p.vae.config.scaling_factor == pytest.approx(log["vae_scaling_factor"])
    # the benchmark files written by the smoke run are byte-identical to the committed ones (same seed)
    for name in ("demo_mem.txt", "demo_nmem.txt", "demo_nmem_oov.txt", "demo_mem.jsonl"):
        assert (tmp_path / "prompts" / name).read_bytes() == open(os.path.join(PROMPTS, name), "rb").read()


def test_benchmark_files_are_consistent(data):
    mem = open(os.path.join(PROMPTS, "demo_mem.txt"), encoding="utf-8").read().splitlines()
    nmem = open(os.path.join(PROMPTS, "demo_nmem.txt"), encoding="utf-8").read().splitlines()
    recs = [json.loads(ln) for ln in open(os.path.join(PROMPTS, "demo_mem.jsonl"), encoding="utf-8")]
    assert mem == [r["caption"] for r in recs] == list(MEMORIZED_CAPTIONS)
    assert len(nmem) >= len(mem) and not set(nmem) & set(mem)
    train_captions = {c for caps in data["captions"] for c in caps}
    assert not set(nmem) & train_captions, "non-memorized prompts must be unseen in training"
    for r, (caption, k) in zip(recs, data["memorized"]):
        assert r["index"] == k and r["file"] == f"demo_train/{k}.png"
        png = np.asarray(Image.open(os.path.join(PROMPTS, r["file"])).convert("RGB"))
        assert np.array_equal(png, np.asarray(to_pil(data["images"][k])))


def test_dataset_captions_and_memorized_images(data):
    assert data["images"].shape == (1797, 3, 32, 32)
    assert data["images"].min() >= -1 and data["images"].max() <= 1
    i = 5
    name = DIGIT_NAMES[int(data["labels"][i])]
    assert len(data["captions"][i]) == len(TRAIN_TEMPLATES)
    assert all(name in c or str(int(data["labels"][i])) in c for c in data["captions"][i])
    idx = [k for _, k in data["memorized"]]
    sims = pixel_cosine(data["images"][idx], data["images"][idx])
    assert torch.allclose(sims.diagonal(), torch.ones(len(idx)), atol=1e-5)
    assert (sims - torch.eye(len(idx)) * 2).max() < 0.5, "memorized images must be mutually distinct"


def test_pixel_cosine_matches_the_project_definition(data):
    from utils.evaluation.similarity import pixel_vectors
    x = data["images"][:6]
    ours = pixel_cosine(x, x, size=48)
    ref = pixel_vectors([to_pil(im) for im in x], size=48)
    # same definition; differences come only from the 8-bit rounding of the PNG/PIL path
    assert torch.allclose(ours.double(), ref @ ref.T, atol=2e-3)


def test_shared_pairs_and_pair_kinds():
    from utils.demo.model import make_pairs
    d = build_dataset(seed=0, n_shared=5, generic=True)
    assert len(set(d["generic"])) == len(d["images"]) and all(len(c.split()) >= 3 for c in d["generic"])
    from utils.demo.data import nonmemorized_prompts
    assert not set(d["generic"]) & (set(MEMORIZED_CAPTIONS) | set(nonmemorized_prompts(0)))
    mem_idx = {k for _, k in d["memorized"]}
    assert len(d["shared"]) == 5 * len(d["memorized"])
    shared_idx = [i for _, i in d["shared"]]
    assert len(set(shared_idx)) == len(shared_idx) and not set(shared_idx) & mem_idx, "shared images are distinct"
    own = dict(d["memorized"])
    for caption, i in d["shared"]:
        assert pixel_cosine(d["images"][[i]], d["images"][[own[caption]]]).item() < 0.5
    # the same seed keeps the memorized choice whatever n_shared is (the benchmark files do not depend on it)
    assert d["memorized"] == build_dataset(seed=0)["memorized"]
    captions = sorted({c for caps in d["captions"] for c in caps} | set(own) | set(d["generic"]))
    pairs = make_pairs(d, {c: i for i, c in enumerate(captions)}, dup=7)
    kinds = torch.bincount(pairs[:, 2], minlength=3).tolist()
    assert kinds == [sum(len(c) for c in d["captions"]) + len(d["images"]), 7 * len(d["memorized"]),
                     5 * len(d["memorized"])]
    assert set(pairs[pairs[:, 2] == 2, 0].tolist()) == set(shared_idx)


def test_too_many_shared_pairs_is_a_clear_error(tmp_path, capsys):
    import train_demo
    with pytest.raises(SystemExit) as e:
        train_demo.main(["--smoke", "--shared", "100", "--out_dir", str(tmp_path / "m")])
    assert e.value.code == 2 and "--shared 100" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_stopping_early_equals_the_snapshot_of_the_full_schedule(tmp_path):
    # The committed model is "1,500 of 2,500 steps": rebuilding it with --stop_frac must give the same weights as
    # the snapshot of the full run at that step (same RNG stream, same lr schedule).
    import train_demo
    from safetensors.torch import load_file
    small = ["--steps", "4", "--vae_steps", "2", "--batch_size", "4", "--vae_batch_size", "4", "--shared", "1"]
    train_demo.main(small + ["--stop_frac", "1", "--snapshot_every", "2", "--out_dir", str(tmp_path / "full")])
    train_demo.main(small + ["--stop_frac", "0.5", "--out_dir", str(tmp_path / "stopped")])
    weights = lambda run, part: load_file(next((tmp_path / run / part).glob("*.safetensors")))
    for part in ("unet", "text_encoder", "vae"):
        a, b = weights("full_step2", part), weights("stopped", part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, c = weights("stopped", "unet"), weights("full", "unet")
    assert not all(torch.equal(a[k], c[k]) for k in a), "two more steps must change the weights"
    log = json.loads((tmp_path / "stopped" / "train_log.json").read_text())
    assert log["unet"][-1]["step"] == 2 and log["args"]["stop_after"] == 2
