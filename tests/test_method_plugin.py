"""A mitigation method is one plug-in: a toy method (the guidance scaled by a factor), defined here and registered
through utils.mitigation.methods.register, runs through mitigate_mem.py with its own flags and grid, and its images
equal plain diffusers sampling with the scaled guidance."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import exit_code
import mitigate_mem
from utils.mitigation import methods as MI
from utils.mitigation.base import Method, Plan, grid_float, hp, is_finite, problems
from utils.models.families import load_pipeline

PROMPTS = ["a red cat sitting on a mat", "Blue Rug by Andover Mills"]
STEPS = 4


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """The toy method's one hyperparameter."""
    factor: float = hp(1.0, type=float)  # multiplies the guidance scale

    def __post_init__(self):
        problems([(is_finite(self.factor), "factor must be a finite number")])

    def to_dict(self):
        return dataclasses.asdict(self)


def plan_toy(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    return Plan(ctx.noise, ctx.encode([prompt]), ctx.guidance_scale * settings.factor, [prompt] * n,
                dict(toy_guidance=ctx.guidance_scale * settings.factor))


TOY = Method("toy", ToySettings, plan_toy, "factor", lambda x: {"factor": grid_float(x)},
             label=lambda s: f"f={s['factor']:g}", flag_prefix="toy_", title="toy: the guidance scaled")


@pytest.fixture
def toy():
    MI.register(TOY)
    try:
        yield TOY
    finally:
        del MI.METHODS["toy"]


def _folder(folder):
    """(header, records, {index: [uint8 arrays]}) of a generation folder."""
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    recs = {r["index"]: r for r in lines[1:]}
    return lines[0]["header"], recs, {i: [np.asarray(Image.open(folder / n)) for n in r["images"]]
                                      for i, r in recs.items()}


def test_toy_method_end_to_end(toy, tiny_eps_dir, tmp_path, capsys):
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    base = ["--model_id", tiny_eps_dir, "--data_path", str(data), "--gen_num", "2", "--device", "cpu",
            "--out_dir", str(tmp_path / "out"), "--num_inference_steps", str(STEPS), "--method", "toy"]
    assert exit_code(mitigate_mem.main, [*base, "--toy_factor", "0.5"]) == 0
    assert exit_code(mitigate_mem.main, [*base, "--grid", "2,0.5"]) == 0
    out = tmp_path / "out" / tiny_eps_dir.rstrip("/").split("/")[-1]
    assert sorted(p.name for p in out.iterdir()) == ["mem_toy", "mem_toy_f0.5", "mem_toy_f2"]
    header, recs, imgs = _folder(out / "mem_toy")
    assert (header["method"], header["settings"], header["setting"]) == ("toy", {"factor": 0.5}, "f=0.5")
    assert [recs[i]["toy_guidance"] for i in (0, 1)] == [3.75, 3.75]
    assert MI.describe_run(header) == ("toy", "f=0.5", {"factor": 0.5}, False)
    pipe = load_pipeline(tiny_eps_dir, torch.device("cpu"), torch.float32)
    for factor, folder in ((0.5, "mem_toy"), (0.5, "mem_toy_f0.5"), (2.0, "mem_toy_f2")):
        _, _, imgs = _folder(out / folder)
        for i, prompt in enumerate(PROMPTS):  # the independent computation: diffusers with the scaled guidance
            torch.manual_seed(42)
            ref = pipe(prompt, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=7.5 * factor).images
            assert all(np.array_equal(np.asarray(r), a) for r, a in zip(ref, imgs[i])), (folder, i)
    torch.manual_seed(42)  # the factor matters: plain guidance gives other pixels than mem_toy_f2 (imgs)
    plain = pipe(PROMPTS[0], num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=7.5).images
    assert not np.array_equal(np.asarray(plain[0]), imgs[0][0])
    # its flag belongs to it alone; its grid values are parsed by its own grid_type
    for argv, msg in (([*base[:-2], "--method", "wen", "--toy_factor", "3"], "--toy_factor is not an option of "
                       "--method wen"), ([*base, "--grid", "x"], "not a valid factor for toy"),
                      ([*base, "--wen_lr", "1"], "--wen_lr is not an option of --method toy")):
        capsys.readouterr()
        assert exit_code(mitigate_mem.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_register_refuses_a_taken_name(toy):
    with pytest.raises(ValueError, match="already registered"):
        MI.register(dataclasses.replace(TOY))
    assert MI.METHODS["toy"] is TOY and "toy" in MI.METHODS and list(MI.METHODS)[:2] == ["none", "sail"]
