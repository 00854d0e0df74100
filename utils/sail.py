"""SAIL: Sharpness-Aware Initialization for Latent diffusion (Jeon et al., 2025, Algorithm 2).

Searches initial noise x_T whose conditional density is smooth: at the first DDIM timestep t, the sharpness
proxy p(x) = ||D(x + d)||, with D the conditional-minus-unconditional model output and d = D(x)/||D(x)||, plus
alpha*||x|| (keeps x_T Gaussian-looking) must drop below a threshold. Shapes: candidates (B, C, H, W).
"""
import time

import torch

from .scores import alpha_sigma

FORMS = ("reference", "clean")
DEFAULT_ALPHA = {"epsilon": 0.05, "v_prediction": 0.01}  # the reference's weights for SD v1.4 / SD v2.0


def guidance_difference(out, x, alpha, sigma, prediction_type):
    """Cond-minus-uncond of a [uncond; cond] model output (2B, ...), in the space the reference uses.

    epsilon: in eps space. v-prediction: in the reference's 'score' space -(alpha*v - x)/sigma, where x is the
    (2B, ...) model input; x cancels in the difference, so this is -alpha/sigma times the v difference.
    """
    if prediction_type == "v_prediction":
        out = -(alpha * out - x) / sigma
    uc, c = out.chunk(2)
    return c - uc


def sail_latents(unet, scheduler, cond, uncond, latent_shape, *, gen_num=4, seed=42, thres=8.2, lr=0.05,
                 budget=8, max_steps=10, max_rounds=100, alpha=None, form="reference", num_inference_steps=50,
                 dtype=torch.float32, device="cpu"):
    """Optimize initial latents until gen_num of them reach SAIL loss <= thres.

    unet: UNet2DConditionModel-like callable (its weights are not updated); cond, uncond: (1, L, D) prompt
    embeddings; latent_shape: (C, H, W). Rounds draw `budget` candidates (torch seed `seed`, re-seeded each round
    as the reference does) and run at most `max_steps` Adam steps of sum(p + alpha*||x||). Every third failed
    round raises the threshold by 0.1 and draws a new seed with randint(0, 50000), as the reference. Stops after
    `max_rounds` rounds at the latest and then fills up with the lowest-loss candidates seen.

    form="reference" reproduces the paper's code: the model input of the first call and the direction d come from
    the round's initial candidates at every step (gradients still flow through them), and accepted candidates
    keep receiving the round's later updates. form="clean" is Algorithm 2 as written: d from the current
    candidates, accepted candidates frozen at acceptance, and fresh noise for every round (no repeats).

    Returns (latents (gen_num, C, H, W) detached, info dict).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    device = torch.device(device)
    pred = scheduler.config.prediction_type
    alpha_w = DEFAULT_ALPHA[pred] if alpha is None else alpha
    scheduler.set_timesteps(num_inference_steps, device=device)
    t = scheduler.timesteps[0]
    a_t, s_t = alpha_sigma(scheduler, t)
    embeds = torch.cat([uncond.expand(budget, -1, -1), cond.expand(budget, -1, -1)]).detach()
    # The reference re-seeds the global RNG each round and later draws new seeds from the CPU generator; separate
    # generators reproduce those exact numbers without touching global state.
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = cpu_gen if device.type == "cpu" else torch.Generator(device).manual_seed(seed)

    accepted, acc_info, best = [], [], []
    info = dict(seeds=[seed], rounds=0, opt_steps=0, unet_calls=0, thresholds=[thres], reached_threshold=True)
    counter, seeded = 0, None
    t0 = time.time()
    requires = [p.requires_grad for p in _params(unet)]
    for p in _params(unet):
        p.requires_grad_(False)  # the model stays frozen: only the latents get gradients
    try:
        while True:
            if form == "reference" or seeded != info["seeds"][-1]:
                seeded = info["seeds"][-1]
                _reseed(cpu_gen, dev_gen, device, seeded)
            lat = torch.randn((budget, *latent_shape), generator=dev_gen, device=device, dtype=dtype)
            lat.requires_grad_(True)
            opt = torch.optim.Adam([lat], lr=lr)
            taken = set()
            info["rounds"] += 1
            done = False
            with torch.enable_grad():
                x_round = torch.cat([scheduler.scale_model_input(lat, t)] * 2)  # built once per round (reference)
                for _ in range(max_steps):
                    x_in = x_round if form == "reference" else torch.cat([scheduler.scale_model_input(lat, t)] * 2)
                    out = unet(x_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
                    d = guidance_difference(out, x_in, a_t, s_t, pred)
                    d = d / d.reshape(budget, -1).norm(dim=1).view(-1, 1, 1, 1)
                    x_mod = torch.cat([lat + d] * 2)
                    out_mod = unet(x_mod, t, encoder_hidden_states=embeds, return_dict=False)[0]
                    info["unet_calls"] += 2
                    sharp = guidance_difference(out_mod, x_mod, a_t, s_t, pred).reshape(budget, -1).norm(dim=1)
                    loss = sharp + alpha_w * lat.reshape(budget, -1).norm(dim=1)
                    _keep_best(best, lat, loss, gen_num)
                    lvals = loss.detach().tolist()
                    for i in torch.where(loss <= thres)[0].tolist():
                        if i in taken:
                            continue
                        taken.add(i)
                        # reference: a view that keeps changing with lat until the round ends; clean: a frozen copy
                        accepted.append(lat[i].detach() if form == "reference" else lat[i].detach().clone())
                        acc_info.append(dict(loss=lvals[i], round=info["rounds"], seed=info["seeds"][-1],
                                             candidate=i, step=info["opt_steps"]))
                        if len(accepted) >= gen_num:
                            done = True
                            break
                    if done:
                        break
                    opt.zero_grad()
                    loss.sum().backward()
                    opt.step()
                    info["opt_steps"] += 1
            if done:
                break
            counter += 1
            if counter % 3 == 0:
                thres += 0.1
                new_seed = int(torch.randint(0, 50000, (1,), generator=cpu_gen).item())
                info["seeds"].append(new_seed)
                info["thresholds"].append(thres)
            if info["rounds"] >= max_rounds:
                info["reached_threshold"] = False
                break
    finally:
        for p, r in zip(_params(unet), requires):
            p.requires_grad_(r)
    lats = [a.clone() for a in accepted[:gen_num]]
    if len(lats) < gen_num:  # not enough accepted: fill with the best candidates seen (marked in info)
        lats += [b[1] for b in best[:gen_num - len(lats)]]
    info.update(final_threshold=thres, accepted=acc_info[:gen_num], n_accepted=min(len(accepted), gen_num),
                filled_losses=[b[0] for b in best[:gen_num - min(len(accepted), gen_num)]],
                search_seconds=time.time() - t0, alpha=alpha_w, form=form)
    return torch.stack(lats), info


def _params(unet):
    return list(unet.parameters()) if hasattr(unet, "parameters") else []


def _reseed(cpu_gen, dev_gen, device, seed):
    cpu_gen.manual_seed(seed)
    if dev_gen is not cpu_gen:
        dev_gen.manual_seed(seed)


def _keep_best(best, lat, loss, k):
    """Keep the k lowest-loss candidates seen so far as (loss, latent) pairs, sorted."""
    for i, l in enumerate(loss.detach().tolist()):
        if len(best) < k or l < best[-1][0]:
            best.append((l, lat[i].detach().clone()))
            best.sort(key=lambda b: b[0])
            del best[k:]
