"""The mitigation plug-in interface and the harness every method runs on (the comparison of the paper's Figure 6).

Every method turns a prompt into a Plan: initial latents, conditional embeddings (one, or one per image), and a
guidance schedule. run_plan() samples every plan with the same scheduler, steps and UNet calls
(utils.models.denoisers.Denoiser.sample), from the same seeded initial noise as plain sampling unless the method changes
it, so results are paired image by image.

A method is one Method record (utils.mitigation.methods.register): its settings dataclass (one field per
hyperparameter, each a mitigate_mem.py flag --<flag_prefix><field>; field metadata as utils.cli.settings_arguments
reads it), its plan function (ctx, index, prompt, settings) -> Plan, and its grid. Every random draw depends only on
(seed, prompt index), never on the order in which prompts are processed.
"""
import contextlib
import dataclasses
import math
from typing import Callable, Optional

import torch


# ------------------------------------------------------------------------------------------------ settings

def problems(checks):
    """ValueError listing every failed (ok, message) check."""
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise ValueError("; ".join(bad))


def is_finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool)


def grid_float(text):
    """One --grid value as a finite number (ValueError otherwise)."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError("not finite")
    return v


def grid_count(text):
    """One --grid value as an integer >= 0 (ValueError otherwise)."""
    v = int(text)
    if v < 0:
        raise ValueError("negative")
    return v


# ------------------------------------------------------------------------------------------- the harness

@dataclasses.dataclass
class Context:
    """What every method may use for one run. noise: (n, C, H, W) plain sampling's seeded initial noise (the same
    for every prompt); encode: list of K prompts -> their Conditioning (K rows, both branches)."""
    model: object                 # utils.models.denoisers.Denoiser
    family: object                # the model's utils.models.families.Family (per-family hyperparameters)
    encode: Callable
    noise: torch.Tensor
    seed: int
    tokenizer: object = None      # the pipeline's tokenizer (RTA's token texts; attention-based methods)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    search: Optional[Callable] = None  # SAIL's search, (index, cond, settings) -> (latents, info); None: one prompt


@dataclasses.dataclass
class Plan:
    """How to sample one prompt's n images. latents (n, C, H, W); cond: Conditioning of 1 or n rows; guidance: a
    number or callable(i, t, out) -> number or (n,) tensor (Denoiser.sample); prompts: the text each image came from;
    record: the method's manifest fields; context: optional callable returning a context manager around sampling
    (for methods that alter the UNet while it samples, e.g. attention edits)."""
    latents: torch.Tensor
    cond: object
    guidance: object
    prompts: list
    record: dict = dataclasses.field(default_factory=dict)
    context: Optional[Callable] = None
    # a sampling loop of the method's own, (model, latents, cond of n rows, steps) -> final latents, e.g. GUARD's
    # three-branch call; None: Denoiser.sample with `guidance`. Its report(), if any, goes into the record.
    sample: Optional[Callable] = None


def run_plan(ctx, plan):
    """Sample a plan: final latents (n, C, H, W). The model batch is [uncond x n; cond x n], as the pipeline's."""
    n = plan.latents.shape[0]
    cond = plan.cond.expand(n) if len(plan.cond) == 1 else plan.cond
    with torch.no_grad(), (plan.context() if plan.context else contextlib.nullcontext()):
        if plan.sample is not None:
            x = plan.sample(ctx.model, plan.latents, cond, ctx.num_inference_steps)
        else:
            x = ctx.model.sample(plan.latents, cond, ctx.num_inference_steps, plan.guidance)
    for part in (plan.guidance, plan.sample):
        if hasattr(part, "report"):
            plan.record.update(part.report())
    return x


# ------------------------------------------------------------------------------------------- the plug-in

@dataclasses.dataclass(frozen=True)
class Method:
    """A mitigation method: its settings dataclass, plan function, and the hyperparameter a --grid value sets
    (grid_field; grid_type parses one value into {field: value}, ValueError if malformed) with the papers' five
    settings (grid: a list of overrides of the settings, used by every model family whose profile gives none)."""
    name: str
    settings: type
    plan: Callable
    grid_field: Optional[str] = None
    grid_type: Optional[Callable] = None
    grid: tuple = ()
    label: Optional[Callable] = None     # settings dict -> short text naming the setting
    sort_key: Optional[Callable] = None  # settings dict -> order of the settings (default: grid_field ascending)
    flag_prefix: str = ""                # its flags are --<flag_prefix><field> (or a field's metadata 'flag')
    title: str = ""                      # heading of its flags in --help
    batch: Optional[Callable] = None     # (ctx, settings, prompts, indices, k) -> ctx searching k prompts at once
    family_defaults: tuple = ()          # (field, family hparam key): a field left None takes the family's value
    # (loaded model, settings, cache folder) -> None: work before any image (NeMo's activation statistics);
    # UserError when it cannot be done
    prepare: Optional[Callable] = None
    # family -> the sampling of the authors' released code where it differs from the harness's (DDIM, guidance
    # 7.5): {'sampler': name, 'guidance_scale': w, 'source': where it is from}; None: the harness is theirs
    author: Optional[Callable] = None
    family_needs: tuple = ()             # (field, family hparam key): the method resolves it itself; one of the two
                                         # must be set (checked before the run, the settings unchanged)


def folder_tag(label):
    """A setting label as a folder-name part: 'thres=0.6' -> 'thres0.6', 't=500, w=-2' -> 't500_w-2'."""
    return label.replace(", ", "_").replace("=", "").replace(" ", "_")


def hp(default, **flag):
    """A settings field with its default and its flag's metadata (utils.cli.settings_arguments: type, choices,
    flag, cli=False)."""
    return dataclasses.field(default=default, metadata=flag)
