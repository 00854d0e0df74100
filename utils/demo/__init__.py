"""The bundled demo (a tiny digits model that memorizes, its CLIP) and the random tiny pipeline, registered as a
model family, a model built in code and a CLIP model, so the harness reaches them by name like any other model.
Importing this package registers them (utils.startup does, for the scripts).
"""
import dataclasses
import os

from ..cli import UserError, one_line
from ..models.sd3 import SD3  # also the family of 'tiny-sd3'
from ..models import flux  # noqa: F401  (the families of 'tiny-flux' and 'tiny-flux-schnell')
from ..models.clip import register_clip
from ..models.families import SD1, register, register_builder
from ..models.loading import DEMO_FLOW_MODEL_DIR, DEMO_MODEL_DIR

DEMO = register(dataclasses.replace(
    SD1, name="demo", title="the bundled demo model (SD-shaped, epsilon, 32 px)", paths=(DEMO_MODEL_DIR,),
    hparams=dict(SD1.hparams, grids={  # chosen on the demo (docs/demo.md: calibration), not from a paper
        "sail": [{"thres": v} for v in (0.5, 0.55, 0.6, 0.7, 0.8)],
        "wen": [{"target_loss": v} for v in (0.25, 0.5, 0.75, 1.0, 1.25)],
        # Han et al.'s SD v1.4 values scaled to the demo's 256-dimensional latent (docs/mitigation.md): rho by the
        # noise norm (16 against 128), l_target by the ratio of the demo's Wen grid to SD v1.4's (1/4)
        "han_batch": [{"rho": v} for v in (1.25, 3.125, 6.25, 9.375, 12.5)],
        "han_sample": [{"target_loss": v} for v in (0.175, 0.2, 0.225, 0.25, 0.275)]}, paper_usable=None)))

# The flow demo (train_demo_flow.py, docs/demo.md "The flow demo"): the SD3 profile on its own folder, so that its
# results are labelled as the demo's and it can carry demo-calibrated values of its own.
# No paper publishes a value for a flow model. Rules (docs/flow.md, docs/demo.md "The flow demo"): the flow demo is
# the UNet demo's twin (same data, same 4 x 8 x 8 latent), so it takes the anisotropy weights the demo takes
# (Asthana & Belagiannis's SD v1.4 weights, which the demo inherits from SD1) and SAIL's alpha of the demo (0.02,
# for the same 256-dimensional latent); SAIL's threshold by the demo's calibration rule: the 95th percentile of
# the proxy p(x_T) of the non-memorized prompts at random noise (2.19 on demo_nmem.txt, seed 42, n = 4) plus
# alpha * E||x_T|| (0.02 * 16 = 0.32), rounded: 2.5.
DEMO_FLOW = register(dataclasses.replace(
    SD3, name="demo_flow", title="the bundled flow demo (SD3-shaped, rectified flow, 32 px)",
    paths=(DEMO_FLOW_MODEL_DIR,), hparams=dict(SD3.hparams, aniso_weights=SD1.hparams["aniso_weights"],
                                                sail_alpha=0.02, sail_thres=2.5),
    by_rule=("aniso_weights", "sail_alpha", "sail_thres")))


def _tiny(prediction_type="epsilon"):
    from .model import tiny_pipeline
    return tiny_pipeline(prediction_type=prediction_type)


def _tiny_xl():
    from .model import tiny_xl_pipeline
    return tiny_xl_pipeline()


def _tiny_sd3():
    from .model import tiny_sd3_pipeline
    return tiny_sd3_pipeline()


def _tiny_flux(guidance_embeds=True):
    from .model import tiny_flux_pipeline
    return tiny_flux_pipeline(guidance_embeds=guidance_embeds)


register_builder("tiny", "sd1", _tiny)
register_builder("tiny-xl", "sdxl", _tiny_xl)
register_builder("tiny-sd3", "sd3", _tiny_sd3)
register_builder("tiny-flux", "flux", _tiny_flux)
register_builder("tiny-flux-schnell", "flux_schnell", lambda: _tiny_flux(guidance_embeds=False))


def _load_demo_clip(folder, device):
    """The demo CLIP model (utils.demo.clip, same interface as open_clip's)."""
    from .clip import DEFAULT_DIR, load_demo_clip
    folder = folder or DEFAULT_DIR
    if not os.path.isdir(folder):
        raise UserError(f"demo CLIP weights folder {folder!r} does not exist")
    try:
        model, preprocess, tokenizer = load_demo_clip(folder, device=device)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load the demo CLIP model from {folder}: {one_line(e)[:300]}") from None
    return model.eval(), preprocess, tokenizer


register_clip("demo", _load_demo_clip)
