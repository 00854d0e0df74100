"""The demo CLIP (utils/demo_clip.py, train_demo_clip.py, demo_clip/): loads, scores in the right direction through
utils.similarity unchanged, is far above chance on held-out images, trains deterministically, fails clearly."""
import json
import os

import pytest
import torch

from utils.demo import clip as DC
from utils.evaluation import similarity as S
from utils.cli import UserError
from utils.demo.data import COLORS, DIGIT_NAMES, to_pil


@pytest.fixture(scope="module")
def committed():
    model, preprocess, tokenizer = DC.load_demo_clip()
    with open(os.path.join(DC.DEFAULT_DIR, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    data = DC.dataset(**cfg["data"])
    holdout = DC.holdout_indices(data, cfg["holdout_fraction"], cfg["seed"])
    assert holdout == cfg["holdout"], "the committed split is the seeded one"
    return model, preprocess, tokenizer, data, holdout


def test_committed_weights_are_small_and_held_out_images_never_trained(committed):
    model, _, _, data, holdout = committed
    assert os.path.getsize(os.path.join(DC.DEFAULT_DIR, "model.safetensors")) < 2e6
    assert not {k for _, k in data["memorized"]} & set(holdout)
    assert not {i for i, _ in DC.training_pairs(data, holdout)} & set(holdout)


def test_zero_shot_colour_and_digit_on_held_out_images_are_far_above_chance(committed):
    # Computed here from the data through the public interface (PIL images, preprocess, tokenizer), not the log.
    model, preprocess, tokenizer, data, holdout = committed
    images = [to_pil(data["images"][i]) for i in holdout]
    grid = [(c, d) for c in range(len(COLORS)) for d in range(10)]
    prompts = [f"a {list(COLORS)[c]} handwritten {DIGIT_NAMES[d]}" for c, d in grid]
    img = S.embed(model.encode_image, preprocess, images)
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=1)
    best = (img @ txt.T).argmax(1).tolist()
    colour = sum(grid[b][0] == int(data["colors"][i]) for b, i in zip(best, holdout)) / len(holdout)
    digit = sum(grid[b][1] == int(data["labels"][i]) for b, i in zip(best, holdout)) / len(holdout)
    assert colour >= 1 / 8 + 0.5, colour
    assert digit >= 1 / 10 + 0.3, digit


def test_matching_caption_scores_higher_than_a_mismatched_one_through_clip_scores(committed):
    model, preprocess, tokenizer, data, holdout = committed
    names = list(COLORS)
    images = [to_pil(data["images"][i]) for i in holdout]
    lab, col = data["labels"][holdout].tolist(), data["colors"][holdout].tolist()
    own = [f"{names[c]} number {d} on a black background" for d, c in zip(lab, col)]
    other = [f"{names[(c + 3) % 8]} number {(d + 5) % 10} on a black background" for d, c in zip(lab, col)]
    s_own = S.clip_scores(model, preprocess, tokenizer, images, own)
    s_other = S.clip_scores(model, preprocess, tokenizer, images, other)
    assert s_own.dtype == torch.float64 and s_own.shape == (len(holdout),)
    assert s_own.abs().max() <= 1 + 1e-6
    assert s_own.mean() > s_other.mean() + 0.2
    assert (s_own > s_other).float().mean() > 0.8


def test_preprocess_and_tokenizer_follow_the_open_clip_interface(committed):
    model, preprocess, tokenizer, data, _ = committed
    big = to_pil(data["images"][0]).resize((96, 96))
    x = preprocess(big)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(preprocess(to_pil(data["images"][0])), data["images"][0], atol=1 / 255)
    ids = tokenizer(["a red three", "astronaut riding a horse on the moon", ""])
    assert ids.dtype == torch.long and ids.shape[0] == 3
    assert (ids[1] == DC.OOV).any() and (ids[0] != DC.OOV).all()  # unseen words map to the OOV id
    with torch.no_grad():
        assert model.encode_text(ids).shape == (3, model.encode_image(x[None]).shape[1])


def test_tiny_training_run_writes_a_loadable_model_and_is_deterministic(tmp_path, capsys):
    import train_demo_clip
    small = ["--steps", "3", "--batch_size", "16", "--threads", "1"]
    train_demo_clip.main(small + ["--out_dir", str(tmp_path / "a")])
    train_demo_clip.main(small + ["--out_dir", str(tmp_path / "b")])
    a, b = ((tmp_path / r / "model.safetensors").read_bytes() for r in "ab")
    assert a == b
    assert "zero-shot colour" in capsys.readouterr().out
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["args"]["steps"] == 3 and log["losses"][-1]["step"] == 3 and "heldout" in log["metrics"]
    model, preprocess, tokenizer = DC.load_demo_clip(str(tmp_path / "a"))
    s = S.clip_scores(model, preprocess, tokenizer, [to_pil(torch.zeros(3, 32, 32))], ["the digit 3"])
    assert s.shape == (1,) and torch.isfinite(s).all()


@pytest.mark.parametrize("argv", [["--steps", "-1"], ["--batch_size", "1"], ["--token_dropout", "1.5"],
                                  ["--no_such_flag"]])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, argv):
    import train_demo_clip
    with pytest.raises(SystemExit) as e:
        train_demo_clip.main(argv + ["--out_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "m").exists()


def test_missing_or_corrupt_weights_say_how_to_rebuild(tmp_path):
    with pytest.raises(UserError, match="train_demo_clip.py"):
        DC.load_demo_clip(str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="train_demo_clip.py"):
        DC.load_demo_clip(str(tmp_path))
