"""Detectors as plug-ins: a detector defined here, registered through the public registry, runs end to end through
detect_mem.py (its flag made from its settings dataclass) and gives the number an independent diffusers call gives;
the registry lists the built-in detectors with their directions."""
import dataclasses
import json

import pytest
import torch

from cli_run import exit_code
import detect_mem
from utils.detection import DETECTORS, Detector, register
from utils.models.families import SD1, load_pipeline

PROMPTS = ["a red square on a blue field", "digit seven"]


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """The toy's one option."""
    toy_scale: float = 1.0  # toy: factor on the norm


class Toy(Detector):
    """scale * ||out(x_T, c)||: the norm of the conditional output at the first step (lower = memorized)."""
    name = "toy"
    direction = "lower"
    Settings = ToySettings
    description = "toy: scale times the norm of the conditional output at step 1"

    def trajectory(self):
        return 1

    def on_step(self, p, s):
        cond = s.out.chunk(2)[1]
        p.values[self.name][:, 0] = self.settings.toy_scale * cond.float().flatten(1).norm(dim=1)


@pytest.fixture
def toy():
    register(Toy)
    yield Toy
    del DETECTORS["toy"]


def test_registry_lists_the_built_in_detectors_with_their_directions():
    assert {k: v.direction for k, v in DETECTORS.items()} == {
        "sharpness": "higher", "wen": "higher", "anisotropy": "higher", "tiled_l2": "lower", "le": "higher",
        "ae": "higher", "be": "higher", "metric2": "higher", "dsm": "higher",
        "curv_ds": "higher", "curv_dh": "higher", "nemo": "higher", "curv_ds_theta": "higher",
        "curv_dh_theta": "higher"}
    with pytest.raises(ValueError):
        register(type("Bad", (Detector,), dict(name="bad", direction="sideways")))
    assert "bad" not in DETECTORS


def test_a_registered_detector_runs_through_detect_mem(toy, tiny_eps_dir, tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS))
    out = tmp_path / "o"
    # the toy's flag comes from its dataclass; flags of detectors not requested are still accepted
    argv = ["--model_id", tiny_eps_dir, "--data_path", str(data), "--gen_num", "2", "--metrics", "toy,wen",
            "--toy_scale", "2.5", "--wen_steps", "1", "--tile_px", "3", "--device", "cpu", "--out_dir", str(out)]
    args, flags = detect_mem.parse_args(argv)
    assert flags["toy"] == [("toy_scale", "toy_scale")] and args.toy_scale == 2.5
    assert exit_code(detect_mem.main, argv) == 0
    side = json.loads((out / "p_toy_gen2.json").read_text())
    assert side["metric"]["direction"] == "lower" and side["metric"]["description"] == Toy.description
    assert side["metric"]["settings"] == dict(num_inference_steps=50, guidance_scale=7.5, toy_scale=2.5)
    got = torch.tensor(side["per_generation"])  # (prompts, steps, n)
    assert got.shape == (2, 1, 2)

    # independently: plain diffusers calls on the same noise, one prompt and branch at a time
    pipe = load_pipeline(tiny_eps_dir, torch.device("cpu"), torch.float32)
    lat = SD1.initial_latents(pipe, 2, 42)
    pipe.scheduler.set_timesteps(50)
    with torch.no_grad():
        for k, prompt in enumerate(PROMPTS):
            c = pipe.encode_prompt(prompt, "cpu", 1, False)[0].expand(2, -1, -1)
            e_c = pipe.unet(lat, pipe.scheduler.timesteps[0], encoder_hidden_states=c).sample
            torch.testing.assert_close(got[k, 0], 2.5 * e_c.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    pt = torch.load(out / "p_toy_gen2.pt")
    assert pt.dtype == torch.float32 and torch.equal(pt, got.mean(dim=2))
    # the shared pass: the toy and wen saw the same step-1 forward (wen alone gives the same file)
    wen_alone = tmp_path / "w"
    assert exit_code(detect_mem.main, argv[:7] + ["wen", "--wen_steps", "1", "--device", "cpu",
                                                  "--out_dir", str(wen_alone)]) == 0
    assert torch.equal(torch.load(wen_alone / "p_wen_gen2.pt"), torch.load(out / "p_wen_gen2.pt"))


def test_anisotropy_in_score_space_counts_the_score_form_in_its_identity():
    """Its norm term then depends on --v_score (v-prediction), so a resumed run must match it; the authors'
    output space does not depend on it."""
    from utils.detection import DETECTORS
    aniso = DETECTORS["anisotropy"]
    assert aniso(aniso.Settings(aniso_space="score")).model_options == ("v_score",)
    assert aniso(aniso.Settings()).model_options == ()
