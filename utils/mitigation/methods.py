"""Mitigation methods on one harness (the comparison of the paper's Figure 6).

Every method turns a prompt into a Plan: initial latents, conditional embeddings (one, or one per image), and a
guidance schedule. run_plan() samples every plan with the same scheduler, steps and UNet calls
(utils.models.denoisers.Denoiser.sample), from the same seeded initial noise as plain sampling unless the method changes
it, so results are paired image by image. Methods:

  none       plain sampling
  sail       SAIL (Jeon et al., 2025; utils.sail): searched initial noise
  wen        Wen et al. (ICLR 2024): the prompt embedding optimized at the first step down to a target loss
  rna, rta   Somepalli et al. (2023), as in Wen et al.'s code: random numbers / random tokens inserted in the prompt
  cfg_delay  Jain et al. (CVPR 2025): no guidance until a transition point (static timestep or dynamic rule)
  ren        Ren et al. (ECCV 2024): cross-attention edit while sampling (summary tokens masked, the start
             token's logit scaled by C on the conditional branch), through utils.attention

Adding a method = one plan function (ctx, index, prompt, settings) -> Plan and one METHODS entry. Every random
draw depends only on (seed, prompt index), never on the order in which prompts are processed.
"""
import contextlib
import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import torch

from .sail import SailSettings, frozen, resolve_alpha, sail_latents
from ..models.denoisers import flat_norm


# ------------------------------------------------------------------------------------------------ settings

def _problems(checks):
    """ValueError listing every failed (ok, message) check."""
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise ValueError("; ".join(bad))


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """`none` has no hyperparameters."""

    def to_dict(self):
        return {}


@dataclasses.dataclass(frozen=True)
class WenSettings:
    """Wen et al.'s inference-time mitigation (their inference_mem.py / local_sd_pipeline.aug_prompt).

    The loss is ||out(x_T, e) - out(x_T, empty)|| at the first DDIM timestep, over the n images' fixed initial
    noise; the conditional embedding e (all 77 positions but BOS) is optimized until the loss, evaluated before
    each update, is <= target_loss, for at most max_iters updates.
    """
    target_loss: float = 3.0     # l_target (their README: 3; paper grid 1-5 for SD v1.4, 1-2 for SD v2.0)
    lr: float = 0.05             # their --optim_lr (the paper: "Adam, lr 0.05")
    max_iters: int = 10          # their --optim_iters
    optimizer: str = "adamw"     # their code: torch.optim.AdamW (decoupled weight decay); the paper says Adam
    weight_decay: float = 0.01   # AdamW's default, which their code keeps; unused by "adam"
    space: str = "output"        # raw model output difference (v on v-prediction models, their code); "eps"
    loss: str = "joint"          # one Frobenius norm over all n images (their code); "mean": mean per-image norm

    def __post_init__(self):
        _problems([(_finite(self.target_loss), "target_loss must be a finite number"),
                   (_finite(self.lr) and self.lr > 0, "lr must be a positive number"),
                   (_count(self.max_iters) and self.max_iters >= 0, "max_iters must be an integer >= 0"),
                   (self.optimizer in ("adamw", "adam"), "optimizer must be adamw or adam"),
                   (_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a number >= 0"),
                   (self.space in ("output", "eps"), "space must be output or eps"),
                   (self.loss in ("joint", "mean"), "loss must be joint or mean")])

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Random number (rna) / random token (rta) addition, as Wen et al.'s optim_utils (after Somepalli's DCR).

    count words are inserted one after another, each at a uniform gap of the space-split prompt (both ends
    included); a number is uniform in [0, 99999], a token is the decoded text of a uniform id in [0, vocab).
    """
    count: int = 4               # insertions (paper grid {1, 2, 4, 6, 8}; Wen's README RTA command: 4)
    per_image: bool = False      # their code: one augmented prompt per prompt, shared by its n images
    vocab: int = 49400           # their hard-coded id range: CLIP's vocabulary below <|startoftext|> (49406)

    def __post_init__(self):
        _problems([(_count(self.count) and self.count >= 0, "count must be an integer >= 0"),
                   (isinstance(self.per_image, bool), "per_image must be true or false"),
                   (_count(self.vocab) and self.vocab > 0, "vocab must be a positive integer")])

    def to_dict(self):
        return dataclasses.asdict(self)


CFG_RULES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class CfgDelaySettings:
    """Jain et al.'s delayed classifier-free guidance (SonyResearch/mitigating_memorization).

    static: steps whose timestep t > transition use w_pre, the others w_post (generate_test_dataset_stp.py).
    dynamic: per image, d_j = ||out_uncond - out_cond|| at step j; guidance switches to w_post at the first step
    j with d_j > d_{j-1} and d_{j-2} > d_{j-1} (one step after the first strict local minimum; that step included;
    generate_test_dataset_dtp.py). w_pre None: their value, 0 for static (unconditional) and 1 for dynamic
    (conditional only). A negative w_pre is their opposite guidance (README: -2 until t = 650).
    """
    rule: str = "static"
    transition: float = 500.0    # static: a timestep value, as their --guidance_change_step
    w_pre: Optional[float] = None
    w_post: float = 7.5

    def __post_init__(self):
        _problems([(self.rule in CFG_RULES, f"rule must be one of {', '.join(CFG_RULES)}"),
                   (_finite(self.transition), "transition must be a finite timestep"),
                   (self.w_pre is None or _finite(self.w_pre), "w_pre must be a finite number"),
                   (_finite(self.w_post), "w_post must be a finite number")])

    @property
    def pre_scale(self):
        return self.w_pre if self.w_pre is not None else (0.0 if self.rule == "static" else 1.0)

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RenSettings:
    """Ren et al.'s inference-time mitigation (renjie3/MemAttn: local_cmd_inference_time_mitigation.sh, the
    attention processor): in every cross-attention layer at every step, the logits of the summary tokens (after
    the prompt's first end-of-text token) are masked in both branches and the start token's logit is multiplied
    by C on the conditional branch. Their README's setting: C = 1.25 with the mask; the sharpness paper's grid:
    C in {1.1, 1.2, 1.25, 1.3, 1.5}."""
    factor: float = 1.25           # C, their --c1
    mask: bool = True              # their --cross_attn_mask: mask positions >= L (L = BOS + prompt + first EOS)
    drop_first_eos: bool = False   # their --mask_length_minis1: also mask the first end-of-text token

    def __post_init__(self):
        _problems([(_finite(self.factor), "factor must be a finite number"),
                   (isinstance(self.mask, bool), "mask must be true or false"),
                   (isinstance(self.drop_first_eos, bool), "drop_first_eos must be true or false")])

    def to_dict(self):
        return dataclasses.asdict(self)


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


def run_plan(ctx, plan):
    """Sample a plan: final latents (n, C, H, W). The model batch is [uncond x n; cond x n], as the pipeline's."""
    n = plan.latents.shape[0]
    cond = plan.cond.expand(n) if len(plan.cond) == 1 else plan.cond
    with torch.no_grad(), (plan.context() if plan.context else contextlib.nullcontext()):
        x = ctx.model.sample(plan.latents, cond, ctx.num_inference_steps, plan.guidance)
    if hasattr(plan.guidance, "report"):
        plan.record.update(plan.guidance.report())
    return x


def plan_none(ctx, index, prompt, settings=None):
    n = ctx.noise.shape[0]
    return Plan(ctx.noise, ctx.encode([prompt]), ctx.guidance_scale, [prompt] * n)


def plan_sail(ctx, index, prompt, settings):
    """SAIL's searched initial noise (seeded by settings.seed alone, as the reference: the same for every prompt
    order), then ordinary sampling."""
    n = ctx.noise.shape[0]
    cond = ctx.encode([prompt])
    settings = resolve_alpha(settings, ctx.family.hparam("sail_alpha"))
    lat, info = ctx.search(index, cond, settings) if ctx.search else sail_latents(
        ctx.model, cond, tuple(ctx.noise.shape[1:]), settings, dtype=ctx.noise.dtype,
        device=ctx.noise.device)
    rec = dict(seeds=info["seeds"], final_threshold=info["final_threshold"], rounds=info["rounds"],
               opt_steps=info["opt_steps"], unet_calls=info["unet_calls"],
               accepted_losses=[a["loss"] for a in info["accepted"]], accepted=info["accepted"],
               filled_losses=info["filled_losses"], reached_threshold=info["reached_threshold"],
               n_accepted=info["n_accepted"], search_unet_calls=info["unet_calls"],
               search_backward_calls=2 * info["opt_steps"], search_batch=2 * settings.budget)
    if "batch_prompts" in info:  # searched together with other prompts (mitigate_mem --miti_prompt_batch)
        rec.update(batch_prompts=info["batch_prompts"], batch_search_seconds=info["batch_search_seconds"])
    # the pipeline scales given latents by init_noise_sigma (1 for DDIM); kept for the same arithmetic
    return Plan(lat * ctx.model.scheduler.init_noise_sigma, cond, ctx.guidance_scale, [prompt] * n, rec)


# ----------------------------------------------------------------------------------------------- Wen et al.

def wen_loss(model, t, x_in, cond, settings):
    """Wen's objective at the doubled, scaled model input x_in (2n, ...) and a Conditioning of n rows: the norm of
    cond-minus-uncond (raw output or eps, per settings.space), jointly over the n images or their mean."""
    out = model.output(x_in, t, cond)
    if settings.space == "eps":
        out = model.eps(out, x_in, t)
    uc, c = out.chunk(2)
    d = (c - uc).float()
    return d.norm() if settings.loss == "joint" else flat_norm(d).mean()


def wen_embedding(model, cond, noise, settings, num_inference_steps=50):
    """Wen et al.'s prompt-embedding optimization of the text embedding of cond (a Conditioning of one row; the
    unconditional branch and any added conditions stay fixed); noise: (n, C, H, W) the initial noise that sampling
    will start from. Returns (the Conditioning with the optimized embedding (one row, detached), manifest record).

    Each iteration evaluates the loss of the current embedding and stops if it is <= target_loss (at the first,
    the original embedding is returned unchanged); otherwise one optimizer step with the gradient at position 0
    (BOS) zeroed. After max_iters updates the last embedding is returned without evaluating it, as their code.
    """
    st, n = settings, noise.shape[0]
    t = model.timesteps(num_inference_steps, device=noise.device)[0]
    x_in = model.scale_input(torch.cat([noise, noise]), t)
    e = cond.cond.detach().clone().requires_grad_(True)
    opt = (torch.optim.AdamW([e], lr=st.lr, weight_decay=st.weight_decay) if st.optimizer == "adamw"
           else torch.optim.Adam([e], lr=st.lr))
    losses, reached, updates = [], False, 0
    with frozen(model.unet), torch.enable_grad():
        for _ in range(st.max_iters):
            loss = wen_loss(model, t, x_in, dataclasses.replace(cond, cond=e).expand(n), st)
            losses.append(float(loss.detach()))
            if losses[-1] <= st.target_loss:
                reached = True
                break
            opt.zero_grad()
            loss.backward()
            e.grad[:, 0] = 0
            opt.step()
            updates += 1
    rec = dict(wen_losses=losses, wen_updates=updates, reached_target=reached,
               search_unet_calls=len(losses), search_backward_calls=updates, search_batch=2 * n)
    return dataclasses.replace(cond, cond=e.detach()), rec


def plan_wen(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    emb, rec = wen_embedding(ctx.model, ctx.encode([prompt]), ctx.noise, settings,
                             ctx.num_inference_steps)
    return Plan(ctx.noise, emb, ctx.guidance_scale, [prompt] * n, rec)


# ------------------------------------------------------------------------------------------------ RNA / RTA

def augmentation_rng(seed, index):
    """The generator of one prompt's insertions: seeded by (seed, prompt index) only."""
    return np.random.default_rng([int(seed), int(index)])


def insert_words(prompt, count, rng, draw):
    """prompt with `count` words from draw(rng) inserted one by one, each at a uniform gap of the space-split
    word list (len + 1 gaps: both ends included). Returns (new prompt, inserted words in order)."""
    words, added = prompt.split(" "), []
    for _ in range(count):
        pos = int(rng.integers(0, len(words) + 1))
        added.append(draw(rng))
        words.insert(pos, added[-1])
    return " ".join(words), added


def random_number(rng):
    return str(int(rng.integers(0, 100000)))


def augmented_prompts(prompt, index, seed, n, settings, draw):
    """The n per-image prompts of one prompt (one draw shared by all unless settings.per_image) and the words
    inserted into each: (list of n prompts, list of n lists of words)."""
    rng = augmentation_rng(seed, index)
    drawn = [insert_words(prompt, settings.count, rng, draw) for _ in range(n if settings.per_image else 1)]
    drawn = drawn if settings.per_image else drawn * n
    return [p for p, _ in drawn], [w for _, w in drawn]


def _plan_augment(ctx, index, prompt, settings, draw):
    n = ctx.noise.shape[0]
    prompts, inserted = augmented_prompts(prompt, index, ctx.seed, n, settings, draw)
    cond = ctx.encode(prompts if settings.per_image else prompts[:1])
    return Plan(ctx.noise, cond, ctx.guidance_scale, prompts, dict(inserted=inserted))


def plan_rna(ctx, index, prompt, settings):
    return _plan_augment(ctx, index, prompt, settings, random_number)


def plan_rta(ctx, index, prompt, settings):
    from ..models.clip import token_text
    return _plan_augment(ctx, index, prompt, settings,
                         lambda rng: token_text(ctx.tokenizer, int(rng.integers(0, settings.vocab))))


# ------------------------------------------------------------------------------------------------ CFG delay

class StaticDelay:
    """Guidance w_pre while the timestep t > transition, then w_post (Jain's static transition point)."""

    def __init__(self, transition, w_pre, w_post):
        self.transition, self.w_pre, self.w_post, self.pre_steps = transition, w_pre, w_post, 0

    def __call__(self, i, t, out):
        if float(t) > self.transition:
            self.pre_steps += 1
            return self.w_pre
        return self.w_post

    def report(self):
        return dict(pre_steps=self.pre_steps)


class DynamicDelay:
    """Jain's dynamic transition point, per image: w_pre until one step after the first strict local minimum of
    d_j = ||out_uncond - out_cond|| (flattened per image), w_post from that step on. Never fires on a plateau;
    the earliest firing step is 2 (the previous values start at -1, as their code)."""

    def __init__(self, w_pre, w_post):
        self.w_pre, self.w_post = w_pre, w_post
        self.prev = self.prev2 = self.fired = None
        self.fire_step, self.fire_t = [], []

    def __call__(self, i, t, out):
        uc, c = out.chunk(2)
        d = flat_norm(uc - c)
        if self.fired is None:
            self.prev = self.prev2 = torch.full_like(d, -1.0)
            self.fired = torch.zeros_like(d, dtype=torch.bool)
            self.fire_step, self.fire_t = [None] * d.numel(), [None] * d.numel()
        new = ~self.fired & (d > self.prev) & (self.prev2 > self.prev)
        for k in torch.where(new)[0].tolist():
            self.fire_step[k], self.fire_t[k] = i, int(t)
        self.fired = self.fired | new
        self.prev2, self.prev = self.prev, d
        return torch.full_like(d, float(self.w_pre)).masked_fill(self.fired, float(self.w_post))

    def report(self):
        return dict(transition_step=self.fire_step, transition_t=self.fire_t)


def plan_cfg_delay(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    rule = (StaticDelay(settings.transition, settings.pre_scale, settings.w_post) if settings.rule == "static"
            else DynamicDelay(settings.pre_scale, settings.w_post))
    return Plan(ctx.noise, ctx.encode([prompt]), rule, [prompt] * n)


# ---------------------------------------------------------------------------------------------- Ren et al.

def plan_ren(ctx, index, prompt, settings):
    """Sampling with Ren et al.'s attention edit installed on the UNet (utils.attention.RenEdit; removed after
    sampling, also after an error). Their code scales "odd batch rows", the conditional row only when n = 1; the
    edit here scales every conditional row. With C = 1 and no mask nothing is installed: plain sampling, bit for bit."""
    from ..models.attention import CrossAttentionInstrument, RenEdit, prompt_lengths
    n = ctx.noise.shape[0]
    length = prompt_lengths(ctx.tokenizer, [prompt])[0]
    edit = RenEdit(keep_len=length if settings.mask else None, factor=settings.factor, tokens=(0,),
                   drop_first_eos=settings.drop_first_eos)
    active = settings.mask or settings.factor != 1
    context = (lambda: CrossAttentionInstrument(ctx.model.unet, edit=edit)) if active else None
    return Plan(ctx.noise, ctx.encode([prompt]), ctx.guidance_scale, [prompt] * n,
                dict(prompt_length=length, kept_tokens=length - int(settings.drop_first_eos) if settings.mask
                     else None), context)


# ------------------------------------------------------------------------------------------------ registry

def _grid_float(text):
    v = float(text)
    if not math.isfinite(v):
        raise ValueError("not finite")
    return v


def _grid_count(text):
    v = int(text)
    if v < 0:
        raise ValueError("negative")
    return v


def _grid_transition(text):
    return {"rule": "dynamic"} if text.strip() == "dynamic" else {"rule": "static", "transition": _grid_float(text)}


@dataclasses.dataclass(frozen=True)
class Method:
    """A mitigation method: its settings dataclass, plan function, and the hyperparameter a --grid value sets
    (grid_field; grid_type parses one value into {field: value}, ValueError if malformed) with the papers' five
    settings (grid: a list of overrides of the settings, used by every model family whose profile gives none)."""
    settings: type
    plan: Callable
    grid_field: Optional[str] = None
    grid_type: Optional[Callable] = None
    grid: tuple = ()
    label: Optional[Callable] = None   # settings dict -> short text naming the setting


_COUNTS = [{"count": c} for c in (1, 2, 4, 6, 8)]
# Jain et al.'s settings (README): static transition at t = 500, 600, 700 with no guidance before, the opposite-
# guidance variant (-2 until 650), and the dynamic rule; their code uses these on every model.
_CFG_GRID = [{"rule": "static", "transition": 500.0, "w_pre": 0.0}, {"rule": "static", "transition": 600.0,
             "w_pre": 0.0}, {"rule": "static", "transition": 700.0, "w_pre": 0.0},
             {"rule": "static", "transition": 650.0, "w_pre": -2.0}, {"rule": "dynamic", "w_pre": None}]

METHODS = {
    "none": Method(NoSettings, plan_none, label=lambda s: "no mitigation"),
    # SAIL and Wen et al.: the grids differ per model family and sit in the profiles (hparams 'grids')
    "sail": Method(SailSettings, plan_sail, "thres", lambda x: {"thres": _grid_float(x)},
                   label=lambda s: f"thres={s['thres']:g}"),
    "wen": Method(WenSettings, plan_wen, "target_loss", lambda x: {"target_loss": _grid_float(x)},
                  label=lambda s: f"l_target={s['target_loss']:g}"),
    "rna": Method(AugmentSettings, plan_rna, "count", lambda x: {"count": _grid_count(x)}, _COUNTS,
                  lambda s: f"n={s['count']}"),
    "rta": Method(AugmentSettings, plan_rta, "count", lambda x: {"count": _grid_count(x)}, _COUNTS,
                  lambda s: f"n={s['count']}"),
    "cfg_delay": Method(CfgDelaySettings, plan_cfg_delay, "transition", _grid_transition, _CFG_GRID,
                        lambda s: "dynamic" if s["rule"] == "dynamic" else
                        f"t={s['transition']:g}, w={0.0 if s['w_pre'] is None else s['w_pre']:g}"),
    # the sharpness paper's Appendix D: the same five C values for SD v1.4 and v2.0 (the demo uses them too)
    "ren": Method(RenSettings, plan_ren, "factor", lambda x: {"factor": _grid_float(x)},
                  [{"factor": v} for v in (1.1, 1.2, 1.25, 1.3, 1.5)],
                  lambda s: f"C={s['factor']:g}" + ("" if s.get("mask", True) else ", no mask")),
}


def grid_settings(method, base, values=None, family=None):
    """The settings of a grid: base with each override applied. values: list of strings (a ValueError names the
    bad one) or None for the papers' grid for the model family (its profile's hparams 'grids', else the method's
    own grid). Returns a list of settings objects (ValueError for invalid settings)."""
    m = METHODS[method]
    if m.grid_field is None:
        raise ValueError(f"{method} has no hyperparameter to grid over")
    if values is None:
        overrides = (family.hparam("grids", {}) if family else {}).get(method) or m.grid
        if not overrides:
            raise ValueError(f"{method} has no published grid for the {family.name if family else 'unknown'} family; "
                             "give the values")
    else:
        overrides = []
        for v in values:
            try:
                overrides.append(m.grid_type(v))
            except ValueError:
                raise ValueError(f"grid value {v!r} is not a valid {m.grid_field} for {method}") from None
    return [dataclasses.replace(base, **o) for o in overrides]


def setting_label(method, settings_dict):
    """Short text naming one setting of a method, e.g. 'thres=0.6', 'n=4', 't=500, w=0'."""
    m = METHODS.get(method)
    return m.label(settings_dict) if m and m.label else ""


def setting_sort_key(method, settings_dict):
    """Order of a method's settings: its grid hyperparameter ascending (cfg_delay: static by transition, the
    dynamic rule last)."""
    if method == "cfg_delay":
        return (settings_dict.get("rule") == "dynamic", settings_dict.get("transition") or 0.0,
                settings_dict.get("w_pre") or 0.0)
    m = METHODS.get(method)
    v = settings_dict.get(m.grid_field) if m and m.grid_field else None
    return (0, v) if isinstance(v, (int, float)) else (1, 0)


def folder_tag(label):
    """A setting label as a folder-name part: 'thres=0.6' -> 'thres0.6', 't=500, w=-2' -> 't500_w-2'."""
    return label.replace(", ", "_").replace("=", "").replace(" ", "_")


def describe_run(header):
    """(method, setting label, settings dict, gated) of a generation manifest header; headers written before the
    method registry (SAIL and --no_mitigation runs) are understood too."""
    method = header.get("method") or ("none" if header.get("no_mitigation") else "sail")
    settings = header.get("settings") or header.get("sail") or {}
    return method, setting_label(method, settings), settings, bool(header.get("gate"))
