"""Model families as profiles, the Conditioning of the paired call, and denoisers chosen by prediction type."""
import json
import os
import shutil

import pytest
import torch

from cli_run import exit_code
import detect_mem
import utils.demo  # noqa: F401  (registers the demo family and the tiny model)
from utils.cli import UserError
from utils.models import families as F
from utils.models.conditioning import Conditioning
from utils.models.denoisers import EpsDenoiser, VDenoiser, denoiser
from utils.models.loading import DEMO_MODEL_DIR


def test_family_is_read_from_the_folder_config(tiny_eps_dir, tiny_v_dir):
    assert F.family_of(tiny_eps_dir) is F.SD1 and F.family_of(tiny_v_dir) is F.SD2
    assert F.family_of(DEMO_MODEL_DIR).name == "demo" and F.family_of("tiny") is F.SD1
    family, pipe = F.load(tiny_v_dir, torch.device("cpu"), torch.float32)
    assert family is F.SD2 and isinstance(family.denoiser(pipe), VDenoiser)
    # the per-family values the scripts used to look up by model label or prediction type
    assert F.SD1.hparam("aniso_weights") == (1.0, 2.0) and F.SD2.hparam("aniso_weights") == (1.0, 0.1)
    assert F.SD1.hparam("sail_alpha") == 0.05 and F.SD2.hparam("sail_alpha") == 0.01
    assert F.FAMILIES["demo"].hparam("grids")["sail"][0] == {"thres": 0.5}


def _copy_with_index(src, dst, **changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index.update(changes)
    with open(os.path.join(dst, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    return str(dst)


def test_an_unsupported_pipeline_class_is_one_line_naming_the_families(tiny_eps_dir, tmp_path, capsys):
    xl = _copy_with_index(tiny_eps_dir, tmp_path / "xl", _class_name="PixArtAlphaPipeline")
    with pytest.raises(UserError, match="PixArtAlphaPipeline; supported families: sd1 "):
        F.family_of(xl)
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    code = exit_code(detect_mem.main, ["--model_id", xl, "--data_path", str(tmp_path / "p.txt"), "--gen_num", "1",
                                       "--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "PixArtAlphaPipeline" in err[0]
    assert not os.path.exists(tmp_path / "out" / "p_gen1.pt")


def test_a_damaged_model_index_is_one_line(tiny_eps_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_eps_dir, bad)
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable model config"):
        F.family_of(str(bad))


def test_conditioning_stacks_the_branches_as_the_pipeline_does():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    c = Conditioning.of(cond, uncond, 2)
    # written out: [uncond x K*n; c_1, c_1, c_2, c_2, c_3, c_3]
    want = torch.cat([uncond.expand(6, -1, -1), cond[[0, 0, 1, 1, 2, 2]]])
    assert torch.equal(c.stacked()["encoder_hidden_states"], want) and len(c) == 6
    assert torch.equal(c.rows([2, 3]).stacked()["encoder_hidden_states"], torch.cat([want[2:4], want[8:10]]))
    one = Conditioning.of(cond[:1], uncond)
    assert torch.equal(one.expand(3).stacked()["encoder_hidden_states"], Conditioning.of(cond[:1], uncond, 3).stacked()[
        "encoder_hidden_states"])
    assert torch.equal(Conditioning.cat([c.rows([0]), c.rows([5])]).cond, cond[[0, 2]])
    added = Conditioning.of(cond, uncond, 1, added={"text_embeds": (torch.zeros(1, 2), torch.ones(3, 2))})
    kw = added.stacked()["added_cond_kwargs"]["text_embeds"]
    assert torch.equal(kw, torch.cat([torch.zeros(3, 2), torch.ones(3, 2)]))
    assert torch.equal(added.branch("cond")["added_cond_kwargs"]["text_embeds"], torch.ones(3, 2))


def test_the_denoiser_subclass_follows_the_scheduler_and_converts_to_eps():
    from utils.demo.model import ddim_scheduler
    net = torch.nn.Identity()
    eps, v = denoiser(net, ddim_scheduler("epsilon")), denoiser(net, ddim_scheduler("v_prediction"))
    assert type(eps) is EpsDenoiser and type(v) is VDenoiser
    g = torch.Generator().manual_seed(1)
    out, x = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = 981
    a, s = v.alpha_sigma(t)
    torch.testing.assert_close(v.eps(out, x, t), a * out + s * x)
    torch.testing.assert_close(eps.eps(out, x, t), out)
    # the reference's v-"score": its score difference is -1/sigma times the correct one
    ref = denoiser(net, ddim_scheduler("v_prediction"), score_form="reference")
    xx, oo = torch.cat([x, x]), torch.cat([out, out.flip(0)])
    torch.testing.assert_close(ref.score_delta(oo, xx, t), -v.score_delta(oo, xx, t) / s)
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        denoiser(net, ddim_scheduler("sample"))


def test_a_new_family_is_one_registration_and_its_hyperparameters_reach_the_detectors(tiny_eps_dir, tmp_path):
    """A family registered from outside the package (as a new file would) is found from its folder, and its
    per-family hyperparameter (anisotropy weights) is what detect_mem.py uses when no flag is given."""
    import dataclasses

    folder = str(tmp_path / "toy_model")
    shutil.copytree(tiny_eps_dir, folder)
    toy = dataclasses.replace(F.SD1, name="toy", title="a toy family", paths=(folder,),
                              hparams=dict(F.SD1.hparams, aniso_weights=(3.0, 0.5)))
    F.register(toy)
    try:
        assert F.family_of(folder) is toy
        (tmp_path / "p.txt").write_text("a photo of a cat\ndigit seven\n")
        base = ["--data_path", str(tmp_path / "p.txt"), "--gen_num", "2", "--metrics", "anisotropy", "--device", "cpu"]
        runs = {"family": [folder], "flag": [tiny_eps_dir, "--aniso_weights", "3,0.5"], "sd1": [tiny_eps_dir]}
        for name, argv in runs.items():
            assert exit_code(detect_mem.main, ["--model_id", argv[0], *argv[1:], *base,
                                               "--out_dir", str(tmp_path / name)]) == 0
        got = {name: torch.load(tmp_path / name / "p_anisotropy_gen2.pt", weights_only=True) for name in runs}
        assert torch.equal(got["family"], got["flag"]) and not torch.equal(got["family"], got["sd1"])
    finally:
        F.FAMILIES.pop("toy")
