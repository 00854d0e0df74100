"""SAIL: Sharpness-Aware Initialization for Latent diffusion (Jeon et al., 2025, Algorithm 2).

Searches initial noise x_T whose conditional density is smooth: at the first DDIM timestep t, the sharpness
proxy p(x) = ||D(x + d)||, with D the conditional-minus-unconditional model output and d = D(x)/||D(x)||, plus
alpha*||x|| (keeps x_T Gaussian-looking) must drop below a threshold. Shapes: candidates (B, C, H, W).
"""
import dataclasses
import math
import time

import contextlib

import torch

from .base import Method, Plan, grid_float, hp
from ..cli import finite_float, nonneg_float, positive_float, positive_int
from ..models.conditioning import Conditioning

FORMS = ("reference", "clean")


@dataclasses.dataclass(frozen=True)
class SailSettings:
    """Hyperparameters of one SAIL search (paper, Algorithm 2 and Appendix D; defaults = the reference's).

    alpha=None means the model family's weight (its profile's 'sail_alpha': the reference's 0.05 for SD v1.4 and
    0.01 for SD v2.0); the search itself needs it resolved (resolve_alpha).
    """
    gen_num: int = hp(4, cli=False)  # latents to accept per prompt (the run's --gen_num)
    seed: int = hp(42, cli=False)    # torch seed of the first round's candidates (the run's --gen_seed)
    thres: float = hp(None, type=finite_float)  # l_thres on p(x) + alpha*||x|| (None: the family's, 8.2 on SD)
    lr: float = hp(0.05, type=positive_float)  # Adam learning rate on the latents
    budget: int = hp(8, type=positive_int)     # candidates optimized together
    max_steps: int = hp(10, type=positive_int)   # Adam steps per round
    max_rounds: int = hp(100, type=positive_int)  # rounds before giving up on a prompt (the reference can loop forever)
    alpha: float = hp(None, type=nonneg_float)  # weight of ||x_T|| (None: the family's, 0.05 eps / 0.01 v models)
    form: str = hp("reference", choices=FORMS)  # reference: the paper's code; clean: Algorithm 2 as written
    num_inference_steps: int = hp(50, cli=False)  # DDIM schedule whose first timestep is used (the run's flag)

    def __post_init__(self):
        problems = [f"{k} must be a positive integer" for k in ("gen_num", "budget", "max_steps", "max_rounds",
                                                                  "num_inference_steps")
                    if not (isinstance(getattr(self, k), int) and getattr(self, k) > 0)]
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append("lr must be a positive finite number")
        if self.thres is not None and not (isinstance(self.thres, (int, float)) and math.isfinite(self.thres)):
            problems.append("thres must be a finite number")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha >= 0):
            problems.append("alpha must be a finite number >= 0")
        if self.form not in FORMS:
            problems.append(f"form must be one of {FORMS}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self):
        return dataclasses.asdict(self)


def resolve_alpha(settings, family_alpha):
    """The settings with alpha set: its own, else the model family's (profile hparam 'sail_alpha')."""
    return settings if settings.alpha is not None else dataclasses.replace(settings, alpha=family_alpha)


@contextlib.contextmanager
def frozen(module):
    """Weights without gradients inside (only the optimized inputs get them); restored afterwards."""
    params = list(module.parameters()) if hasattr(module, "parameters") else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def sail_latents(model, cond, latent_shape, settings=SailSettings(), *, dtype=torch.float32, device="cpu"):
    """Optimize initial latents until settings.gen_num of them reach SAIL loss <= threshold.

    model: utils.models.denoisers.Denoiser (its weights are not updated); cond: Conditioning of the prompt (one
    row); latent_shape: (C, H, W). Rounds draw `budget` candidates (torch seed `seed`, re-seeded each round
    as the reference does) and run at most `max_steps` Adam steps of sum(p + alpha*||x||). Every third failed
    round raises the threshold by 0.1 and draws a new seed with randint(0, 50000), as the reference. Stops after
    `max_rounds` rounds at the latest and then fills up with the lowest-loss candidates seen.

    form="reference" reproduces the paper's code: the model input of the first call and the direction d come from
    the round's initial candidates at every step (gradients still flow through them), and accepted candidates
    keep receiving the round's later updates. form="clean" is Algorithm 2 as written: d from the current
    candidates, accepted candidates frozen at acceptance, and fresh noise for every round (no repeats).

    Returns (latents (gen_num, C, H, W) detached, info dict).
    """
    # One prompt through the batched search: with a single prompt it builds the very tensors of the one-prompt
    # reference loop (tests/test_sail.py: bit for bit, and against an independent re-implementation).
    (lat, info), = sail_latents_batch(model, cond, latent_shape, settings, dtype=dtype, device=device)
    for key in ("batch_prompts", "batch_search_seconds"):
        del info[key]
    return lat, info


def sail_loss(model, t, cond, lat, x_dir, alpha_w):
    """SAIL's loss per candidate, (B,): p(lat) + alpha*||lat||, with the direction d taken at x_dir.

    p(lat) = ||D(lat + d)||, d = D(x_dir)/||D(x_dir)||, D = model.sail_difference of the pair outputs; x_dir is
    the doubled model input [x; x] (2B, ...) at which the direction is computed. Two UNet calls.
    """
    b = lat.shape[0]
    d = model.sail_difference(model.output(x_dir, t, cond), x_dir, t)
    d = d / d.reshape(b, -1).norm(dim=1).view(-1, 1, 1, 1)
    x_mod = torch.cat([lat + d] * 2)
    sharp = model.sail_difference(model.output(x_mod, t, cond), x_mod, t).reshape(b, -1).norm(dim=1)
    return sharp + alpha_w * lat.reshape(b, -1).norm(dim=1)


def _accept(lat, loss, taken, st, state, info):
    """Accept the candidates whose loss is <= the current threshold (each once per round); True when enough."""
    lvals = loss.detach().tolist()
    for i in torch.where(loss <= state["thres"])[0].tolist():
        if i in taken:
            continue
        taken.add(i)
        # reference: a view that keeps changing with lat until the round ends; clean: a frozen copy
        state["accepted"].append(lat[i].detach() if st.form == "reference" else lat[i].detach().clone())
        state["acc_info"].append(dict(loss=lvals[i], round=info["rounds"], seed=info["seeds"][-1], candidate=i,
                                      step=info["opt_steps"]))
        if len(state["accepted"]) >= st.gen_num:
            return True
    return False


def _keep_best(best, lat, loss, k):
    """Keep the k lowest-loss candidates seen so far as (loss, latent) pairs, sorted."""
    for i, l in enumerate(loss.detach().tolist()):
        if len(best) < k or l < best[-1][0]:
            best.append((l, lat[i].detach().clone()))
            best.sort(key=lambda b: b[0])
            del best[k:]


# ------------------------------------------------------------------------------------------- batched prompts

class _PromptSearch:
    """One prompt's search state inside sail_latents_batch: its own generators, threshold, seeds, accepted and
    best candidates, and the info dict sail_latents returns. The reference re-seeds the global RNG each round and
    later draws new seeds from the CPU generator; separate generators per prompt reproduce those exact numbers
    without touching global state."""

    def __init__(self, st, device):
        self.st = st
        self.cpu_gen = torch.Generator().manual_seed(st.seed)
        self.dev_gen = self.cpu_gen if device.type == "cpu" else torch.Generator(device).manual_seed(st.seed)
        self.state = dict(accepted=[], acc_info=[], best=[], thres=st.thres)
        self.info = dict(seeds=[st.seed], rounds=0, opt_steps=0, unet_calls=0, thresholds=[st.thres],
                         reached_threshold=True)
        self.seeded, self.failures, self.finished = None, 0, False

    def start_round(self, latent_shape, dtype, device, t, model):
        """Draw the round's candidates (reference: re-seeded every round; clean: only when the seed changed): sets lat (budget, C, H, W), its Adam,
        the round's doubled model input piece x_round (budget, ...) and the accepted indices."""
        st, info = self.st, self.info
        if st.form == "reference" or self.seeded != info["seeds"][-1]:
            self.seeded = info["seeds"][-1]
            self.cpu_gen.manual_seed(self.seeded)
            if self.dev_gen is not self.cpu_gen:
                self.dev_gen.manual_seed(self.seeded)
        self.lat = torch.randn((st.budget, *latent_shape), generator=self.dev_gen, device=device, dtype=dtype)
        info["rounds"] += 1
        self.lat.requires_grad_(True)
        self.opt = torch.optim.Adam([self.lat], lr=st.lr)
        self.taken = set()
        with torch.enable_grad():  # the round's doubled model input (reference): values now, gradients to lat
            self.x_round = torch.cat([model.scale_input(model.initial(self.lat), t)] * 2)

    def end_round(self):
        """After a round without enough accepted candidates: every third failure raises the threshold by 0.1 and
        draws a new seed; after max_rounds the search ends unreached. Returns True while the search goes on."""
        st, info = self.st, self.info
        self.failures += 1
        if self.failures % 3 == 0:
            self.state["thres"] += 0.1
            info["seeds"].append(int(torch.randint(0, 50000, (1,), generator=self.cpu_gen).item()))
            info["thresholds"].append(self.state["thres"])
        if info["rounds"] >= st.max_rounds:
            info["reached_threshold"] = False
            return False
        return True

    def result(self, alpha_w, seconds):
        """(latents (gen_num, C, H, W), info) as sail_latents returns them."""
        st, state, info = self.st, self.state, self.info
        accepted, best, n = state["accepted"], state["best"], min(len(state["accepted"]), st.gen_num)
        lats = [a.clone() for a in accepted[:st.gen_num]] + [b[1] for b in best[:st.gen_num - n]]
        info.update(final_threshold=state["thres"], accepted=state["acc_info"][:st.gen_num], n_accepted=n,
                    filled_losses=[b[0] for b in best[:st.gen_num - n]], search_seconds=seconds, alpha=alpha_w,
                    form=st.form)
        return torch.stack(lats), info


def sail_latents_batch(model, conds, latent_shape, settings=SailSettings(), *, dtype=torch.float32, device="cpu"):
    """SAIL for K prompts at once: every UNet call carries the candidates of all prompts still searching.

    conds: Conditioning of K prompts; the rest as sail_latents. Each prompt's search (seeds,
    rounds, threshold raises, acceptance, filling after max_rounds) is exactly the one sail_latents makes for it
    alone: its own generators and Adam, and a UNet row depends only on its own input, so only the batch
    composition differs (results equal within float tolerance). A prompt that finishes leaves the batch at once.
    Returns a list of K (latents (gen_num, C, H, W), info) pairs; info['search_seconds'] is the time from the
    batch's start to that prompt's end (the prompts' times overlap), info['batch_prompts'] = K and
    info['unet_calls'] counts the calls the prompt took part in, 2 per step as alone.
    """
    st = settings
    device = torch.device(device)
    if st.alpha is None:
        raise ValueError("SAIL's alpha is not set: resolve the family's value first (resolve_alpha)")
    if settings.thres is None:
        raise ValueError("SAIL's threshold is not set: take the family's value first (methods.with_family_defaults)")
    alpha_w = st.alpha
    t = model.timesteps(st.num_inference_steps, device=device)[0]
    searches = [_PromptSearch(st, device) for _ in range(len(conds))]
    results = [None] * len(searches)
    t0 = time.time()
    with frozen(model.unet):  # the model stays frozen: only the latents get gradients
        active = list(range(len(searches)))
        while active:
            for j in active:
                searches[j].start_round(latent_shape, dtype, device, t, model)
            _batch_round(model, t, conds, active, searches, alpha_w, st)
            still = []
            for j in active:
                if searches[j].finished or not searches[j].end_round():
                    results[j] = searches[j].result(alpha_w, time.time() - t0)
                else:
                    still.append(j)
            active = still
    for _, info in results:
        info.update(batch_prompts=len(searches), batch_search_seconds=time.time() - t0)
    return results


def _batch_round(model, t, conds, active, searches, alpha_w, st):
    """One round for the prompts `active` (indices into searches and conds), all at step 0 of a fresh round: at
    most st.max_steps Adam steps, one pair of UNet calls per step for all prompts still in the round. Sets
    search.finished for prompts that accept gen_num candidates."""
    b = st.budget
    group = list(active)
    with torch.enable_grad():
        for _ in range(st.max_steps):
            if not group:
                return
            alone = len(group) == 1  # then the very tensors sail_latents uses (same graph, same bits)
            lat = searches[group[0]].lat if alone else torch.cat([searches[j].lat for j in group])
            embeds = Conditioning.cat([conds.rows([j] * b) for j in group]).detach()
            if st.form == "reference" and alone:
                x_in = searches[group[0]].x_round
            elif st.form == "reference":  # [x_uncond rows of every prompt; x_cond rows of every prompt]
                x_in = torch.cat([searches[j].x_round[:b] for j in group] + [searches[j].x_round[b:] for j in group])
            else:
                x_in = torch.cat([model.scale_input(model.initial(lat), t)] * 2)
            loss = sail_loss(model, t, embeds, lat, x_in, alpha_w)
            going = []
            for k, j in enumerate(group):
                s, part = searches[j], loss[k * b:(k + 1) * b]
                s.info["unet_calls"] += 2
                _keep_best(s.state["best"], s.lat, part, st.gen_num)
                if _accept(s.lat, part, s.taken, st, s.state, s.info):
                    s.finished = True
                else:
                    going.append((k, j))
            if not going:
                return
            for _, j in going:
                searches[j].opt.zero_grad()
            kept = loss if len(going) == len(group) else torch.cat([loss[k * b:(k + 1) * b] for k, _ in going])
            kept.sum().backward()
            for _, j in going:
                searches[j].opt.step()
                searches[j].info["opt_steps"] += 1
            group = [j for _, j in going]


class PromptBatches:
    """Hands out SAIL results prompt by prompt while searching `k` prompts at a time (sail_latents_batch).

    order: the prompt indices in the order they will be asked for; encode(indices) -> their Conditioning.
    Calling the object with index i returns (latents, info) for prompt i, searching the next k prompts of
    `order` (from i on) in one batch when i has not been searched yet.
    """

    def __init__(self, model, encode, latent_shape, settings, order, k, **kwargs):
        self.model, self.encode, self.latent_shape = model, encode, latent_shape
        self.settings, self.order, self.k, self.kwargs = settings, list(order), k, kwargs
        self.ready = {}

    def __call__(self, i):
        if i not in self.ready:
            pos = self.order.index(i)
            idx = self.order[pos:pos + self.k]
            out = sail_latents_batch(self.model, self.encode(idx), self.latent_shape, self.settings,
                                     **self.kwargs)
            self.ready.update(zip(idx, out))
        return self.ready.pop(i)


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
    # the pipeline scales given latents by init_noise_sigma (1 for DDIM); kept for the same arithmetic (flow
    # schedulers have none: their pipelines take the latents as they are)
    scale = getattr(ctx.model.scheduler, "init_noise_sigma", 1.0)
    return Plan(lat * scale, cond, ctx.guidance_scale, [prompt] * n, rec)


def batched_context(ctx, settings, prompts, indices, k):
    """ctx whose search runs the SAIL searches of the prompts `indices` (of the list `prompts`) k at a time, each
    prompt's search as alone (mitigate_mem --miti_prompt_batch)."""
    batches = PromptBatches(ctx.model, lambda idx: ctx.encode([prompts[j] for j in idx]), tuple(ctx.noise.shape[1:]),
                            resolve_alpha(settings, ctx.family.hparam("sail_alpha")), indices, k,
                            dtype=ctx.noise.dtype, device=ctx.noise.device)
    return dataclasses.replace(ctx, search=lambda index, cond, settings: batches(index))


# the paper's grids differ per model family: the profiles' hparams 'grids' (utils.models.families)
METHOD = Method("sail", SailSettings, plan_sail, "thres", lambda x: {"thres": grid_float(x)},
                label=lambda s: f"thres={s['thres']:g}", flag_prefix="miti_",
                title="SAIL (paper, Algorithm 2 and Appendix D)", batch=batched_context,
                family_defaults=(("thres", "sail_thres"),), family_needs=(("alpha", "sail_alpha"),))
