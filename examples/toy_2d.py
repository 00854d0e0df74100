"""The paper's 2D toy experiment: a memorized (tiny-covariance) mode is a sharp peak of the learned density.

    python examples/toy_2d.py --out_dir examples/figures          # defaults: ~1-2 minutes on 2 CPU cores
    python examples/toy_2d.py --train_steps 20 --ddim_steps 20 --num_samples 200 --mc_samples 2000  # smoke test

Data: 3,000 samples of a two-component Gaussian mixture, mixture ratio 5:95; the 5% component has an extremely
small covariance (std --mem_std), so a model trained on it memorizes that point. A small time-conditioned MLP score
model is trained on the DDPM schedule (1,000 steps, linear betas 1e-4..0.02) with denoising score matching plus a
second-order term (weight 0.5), as in the paper's Appendix A. With x_t = alpha x_0 + sigma eps and the model's
noise prediction eps_hat = -sigma s (s its score), the loss is

    L = E_{t, x_0, eps} [ ||eps_hat - eps||^2 + lambda || sigma grad_x eps_hat - (I - r r^T) ||_F^2 ],
    r = eps - sg(eps_hat)   (sg = stop-gradient),

the second-order denoising score matching of Lu et al. (2022, "high-order DSM"; cf. Meng et al., 2021): given the
exact first-order eps_hat = E[eps | x_t], E[r r^T | x_t] = Cov[eps | x_t] = I + sigma^2 H with H = grad_x^2 log p_t,
so the minimizer is sigma grad_x eps_hat = -sigma^2 H: the model's score Jacobian matches the true Hessian. (The
target I - eps eps^T + eps_hat eps_hat^T has the same minimizer but fed back on itself and diverged in our runs.)
Implementation choices not from the paper, for a CPU budget of ~1 minute: the network uses EDM-style
preconditioning (Karras et al., 2022) in the coordinates x/alpha, D(x) = c_skip x/alpha + c_out F(c_in x/alpha,
log(sigma/alpha)), s = (alpha D - x) / sigma^2; half of each batch draws t log-uniformly from [0, 200)
(--low_noise_fraction), because the memorized mode is only sharp at low noise; gradients are clipped to norm 1.

Then: DDIM sampling with 500 steps (eta = 0); Hessian eigenvalues along the sampling path of memorized and
non-memorized samples (learned, and the analytic mixture for reference); the learned score field; and the trace
identities checked by Monte Carlo on x ~ p_t: Lemma 4.1 E||s||^2 = -E tr H (any density) and Lemma 4.3
E||H s||^2 = -tr H^3 (Gaussians), for the analytic component / mixture scores and for the learned model.
Writes OUT_DIR/toy_2d.json, toy_2d_score_field.png and toy_2d_hessian_eigenvalues.png.
"""
import io
import math
import os
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import (ArgumentParser, UserError, bounded_float, bounded_int, guarded, parse_int_list,
    quiet_library_warnings, seed_int)
from utils.io import atomic_write_bytes, figure_png, prepare_dir, write_sidecar

T = 1000                                   # DDPM training steps, linear betas as Ho et al. (2020)
BETAS = (1e-4, 0.02)
MU_BROAD, COV_BROAD = (-0.8, -0.5), ((0.30, 0.10), (0.10, 0.20))   # the generalizing 95% component
MU_MEM = (1.5, 1.2)                                                # the memorized 5% component (cov = std^2 I)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_data", type=bounded_int(2, 10_000_000), default=3000)
    p.add_argument("--mem_ratio", type=bounded_float(0, 1, low_open=True, high_open=True), default=0.05,
                   help="weight of the memorized component, in (0, 1)")
    p.add_argument("--mem_std", type=bounded_float(0, 10, low_open=True), default=0.01,
                   help="std of the memorized component")
    p.add_argument("--train_steps", type=bounded_int(1, 10_000_000), default=5000)
    p.add_argument("--batch_size", type=bounded_int(1, 1_000_000), default=512)
    p.add_argument("--lr", type=bounded_float(0, 10, low_open=True), default=2e-3)
    p.add_argument("--second_order_weight", type=bounded_float(0, 1e6), default=0.5,
                   help="lambda of the second-order term, >= 0")
    p.add_argument("--low_noise_fraction", type=bounded_float(0, 1), default=0.5,
                   help="fraction of each batch with t drawn log-uniformly in [0, T/5) instead of uniformly")
    p.add_argument("--hidden", type=bounded_int(1, 65536), default=128)
    p.add_argument("--ddim_steps", type=bounded_int(1, T), default=500, help=f"at most {T}")
    p.add_argument("--num_samples", type=bounded_int(1, 10_000_000), default=1000, help="DDIM samples drawn")
    p.add_argument("--num_paths", type=bounded_int(1, 1000), default=3, help="paths per group in the eigenvalue plot")
    p.add_argument("--trace_steps", default="5,20,100", help="DDPM timesteps t of the trace-identity checks")
    p.add_argument("--mc_samples", type=bounded_int(1, 100_000_000), default=20000,
                   help="Monte-Carlo samples per check")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=bounded_int(1, 1024), default=1, help="torch CPU threads (tiny MLP: 1 is fastest)")
    p.add_argument("--out_dir", default="toy_outputs")
    args = p.parse_args(argv)
    args.trace_steps = parse_int_list(args.trace_steps, 0, T - 1, "--trace_steps")
    return args


def schedule():
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) for t = 0..T-1 (float64)."""
    abar = torch.cumprod(1 - torch.linspace(*BETAS, T, dtype=torch.float64), 0)
    return abar.sqrt(), (1 - abar).sqrt()


def mixture(mem_ratio, mem_std):
    """Component weights (K,), means (K, 2), covariances (K, 2, 2): [memorized, broad], float64."""
    w = torch.tensor([mem_ratio, 1 - mem_ratio], dtype=torch.float64)
    mu = torch.tensor([MU_MEM, MU_BROAD], dtype=torch.float64)
    cov = torch.stack([mem_std ** 2 * torch.eye(2, dtype=torch.float64), torch.tensor(COV_BROAD).double()])
    return w, mu, cov


def sample_mixture(n, w, mu, cov, alpha=1.0, sigma=0.0, gen=None, exact_counts=False):
    """n points of the perturbed mixture sum_k w_k N(alpha mu_k, alpha^2 cov_k + sigma^2 I); also the labels."""
    if exact_counts:
        counts = [round(n * float(w[0]))]
        labels = torch.cat([torch.zeros(counts[0]), torch.ones(n - counts[0])]).long()
    else:
        labels = torch.multinomial(w, n, replacement=True, generator=gen)
    c = alpha ** 2 * cov + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x = alpha * mu[labels] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(c)[labels], z)
    return x, labels


def mixture_logp(x, w, mu, cov, alpha, sigma):
    """log p_t(x) of the perturbed mixture for one point x (2,) (for torch.func grad / hessian)."""
    c = alpha ** 2 * cov + sigma ** 2 * torch.eye(2, dtype=x.dtype)
    d = x[None] - alpha * mu
    quad = torch.einsum("ki,kij,kj->k", d, torch.linalg.inv(c), d)
    logn = -0.5 * quad - 0.5 * torch.logdet(c) - math.log(2 * math.pi)
    return torch.logsumexp(torch.log(w) + logn, 0)


def analytic_score_hessian(x, w, mu, cov, alpha, sigma):
    """Exact score (N, 2) and Hessian (N, 2, 2) of the perturbed mixture (a single Gaussian when K = 1)."""
    from torch.func import grad, hessian, vmap
    f = lambda xi: mixture_logp(xi, w, mu, cov, alpha, sigma)  # noqa: E731
    return vmap(grad(f))(x), vmap(hessian(f))(x)


class ScoreMLP(nn.Module):
    """Time-conditioned MLP denoiser with EDM-style preconditioning; x (B, 2), alpha/sigma (B, 1) -> (B, 2)."""

    def __init__(self, hidden=128, sigma_data=0.7, freqs=8):
        super().__init__()
        self.sigma_data, self.freqs = sigma_data, freqs
        self.net = nn.Sequential(nn.Linear(2 + 2 * freqs + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def denoise(self, x, alpha, sigma):
        st, sd = sigma / alpha, self.sigma_data
        c_noise = torch.log(st) / 4
        f = torch.arange(1, self.freqs + 1, dtype=x.dtype, device=x.device) * math.pi
        emb = torch.cat([c_noise, torch.sin(c_noise * f), torch.cos(c_noise * f)], dim=1)
        xs = x / alpha
        norm = (st ** 2 + sd ** 2).sqrt()
        c_in, c_skip, c_out = 1 / norm, sd ** 2 / norm ** 2, st * sd / norm
        return c_skip * xs + c_out * self.net(torch.cat([c_in * xs, emb], dim=1))

    def eps(self, x, alpha, sigma):
        return (x - alpha * self.denoise(x, alpha, sigma)) / sigma

    def score(self, x, alpha, sigma):
        return (alpha * self.denoise(x, alpha, sigma) - x) / sigma ** 2


def jacobian_2d(fn, x, create_graph=False):
    """Per-sample Jacobian (B, 2, 2) of fn: (B, 2) -> (B, 2) (samples are independent), and fn(x)."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0] for i in (0, 1)]
    return torch.stack(rows, dim=1), y


def second_order_target(eps, eps_hat):
    """Target of sigma grad_x eps_hat: I - r r^T with r = eps - sg(eps_hat), (B, 2) -> (B, 2, 2). Its mean given
    x_t is I - Cov[eps | x_t] = -sigma^2 H when eps_hat = E[eps | x_t]."""
    r = eps - eps_hat.detach()
    return torch.eye(eps.shape[1], dtype=eps.dtype) - r[:, :, None] * r[:, None, :]


def train(model, data, alphas, sigmas, *, steps, batch_size, lr, second_order_weight, low_noise_fraction, gen):
    """Denoising score matching + second-order score matching (the module docstring's L); returns the loss curve
    (every steps/50 steps: total loss and its first-order DSM part)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve = []
    for step in tqdm(range(steps), desc="train", unit="step", mininterval=2):
        x0 = data[torch.randint(0, len(data), (batch_size,), generator=gen)]
        t = torch.randint(0, T, (batch_size,), generator=gen)
        if low_noise_fraction:
            # part of each batch at log-uniformly drawn small t: the sharp memorized mode only shows at low noise
            low = torch.rand(batch_size, generator=gen) < low_noise_fraction
            t_low = torch.exp(torch.rand(batch_size, generator=gen) * math.log(T // 5)).long() - 1
            t = torch.where(low, t_low.clamp(0, T - 1), t)
        a, s = alphas[t, None].float(), sigmas[t, None].float()
        eps = torch.randn(batch_size, 2, generator=gen)
        xt = a * x0 + s * eps
        J, eps_hat = jacobian_2d(lambda x: model.eps(x, a, s), xt, create_graph=second_order_weight != 0)
        loss1 = ((eps_hat - eps) ** 2).sum(1).mean()
        loss = loss1
        if second_order_weight:
            loss2 = ((s[:, :, None] * J - second_order_target(eps, eps_hat)) ** 2).sum((1, 2)).mean()
            loss = loss1 + second_order_weight * loss2
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the eps eps^T target is heavy-tailed
        opt.step()
        sched.step()
        if step % max(1, steps // 50) == 0 or step == steps - 1:
            curve.append(dict(step=step, loss=loss.item(), dsm=loss1.item()))
    return curve


def ddim_timesteps(num):
    """DDIM's 'leading' spacing: num timesteps from T - T/num down to 0."""
    return list(range(0, T, T // num))[:num][::-1]


def ddim_sample(model, xT, alphas, sigmas, num_steps, track=False):
    """Deterministic DDIM (eta = 0) from xT (N, 2); the last step goes to abar = 1 (x_0 = D(x, t_last)).

    track=True also returns the timesteps, and per step the point x_t (N, 2) and the learned score Jacobian
    (N, 2, 2) there."""
    x, ts, pts, jac = xT.float(), ddim_timesteps(num_steps), [], []
    for i, t in enumerate(ts):
        a = torch.full((len(x), 1), float(alphas[t]))
        s = torch.full((len(x), 1), float(sigmas[t]))
        if track:
            J, _ = jacobian_2d(lambda z: model.score(z, a, s), x)
            pts.append(x.clone())
            jac.append(J.detach())
        with torch.no_grad():
            eps = model.eps(x, a, s)
            x0 = (x - s * eps) / a
            tp = ts[i + 1] if i + 1 < len(ts) else None
            a_p, s_p = (float(alphas[tp]), float(sigmas[tp])) if tp is not None else (1.0, 0.0)
            x = a_p * x0 + s_p * eps
    return (x, ts, pts, jac) if track else x


def mc_stats(values):
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel()))


def trace_identity_rows(s, H, **info):
    """Lemma 4.1 (E||s||^2 vs -E tr H) and 4.3 (E||H s||^2 vs -E tr H^3) from per-sample s (M, 2), H (M, 2, 2)."""
    s, H = s.double(), H.double()
    tr = H.diagonal(dim1=1, dim2=2).sum(1)
    tr3 = (H @ H @ H).diagonal(dim1=1, dim2=2).sum(1)
    hs = torch.einsum("mij,mj->mi", H, s)
    rows = []
    for lemma, lhs, rhs in (("4.1", (s ** 2).sum(1), -tr), ("4.3", (hs ** 2).sum(1), -tr3)):
        (lm, ls), (rm, rse), (dm, dse) = mc_stats(lhs), mc_stats(rhs), mc_stats(lhs - rhs)
        rows.append(dict(info, lemma=lemma, lhs=lm, lhs_stderr=ls, rhs=rm, rhs_stderr=rse, rel_diff=dm / abs(rm),
                         z=dm / dse if dse > 0 else (0.0 if dm == 0 else math.copysign(math.inf, dm))))
    return rows


def check_trace_identities(model, w, mu, cov, alphas, sigmas, steps, m, gen):
    """Monte-Carlo trace identities at DDPM timesteps `steps` for the analytic and the learned scores."""
    rows = []
    names = ("memorized component", "broad component")
    for t in steps:
        a, s = float(alphas[t]), float(sigmas[t])
        for dist in (0, 1, None):  # component k alone, then the whole mixture
            ww, mm, cc = (w, mu, cov) if dist is None else (w[dist:dist + 1] / w[dist], mu[dist:dist + 1],
                                                                cov[dist:dist + 1])
            x, _ = sample_mixture(m, ww, mm, cc, a, s, gen)
            name = "mixture" if dist is None else names[dist]
            s_true, h_true = analytic_score_hessian(x, ww, mm, cc, a, s)
            rows += trace_identity_rows(s_true, h_true, t=t, sigma=s, distribution=name, score="analytic",
                                        gaussian=dist is not None)
            J, s_model = jacobian_2d(lambda z: model.score(z, torch.full((m, 1), a), torch.full((m, 1), s)),
                                     x.float())
            rows += trace_identity_rows(s_model.detach(), J.detach(), t=t, sigma=s, distribution=name,
                                        score="learned", gaussian=dist is not None)
    return rows


def eigen_real(H):
    """Eigenvalues (N, 2) of 2x2 matrices, real parts sorted ascending, and the largest |imaginary part|."""
    if not torch.isfinite(H).all():
        raise UserError("the learned score Jacobian is not finite; training failed (lower --lr)")
    ev = torch.linalg.eigvals(H.double())
    return ev.real.sort(dim=1).values, float(ev.imag.abs().max()) if ev.numel() else 0.0


def plots(out_dir, data, labels, samples, model, w, mu, cov, alphas, sigmas, paths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # Figure 1: data and samples, learned score field (full view), zoom on the memorized mode.
    fig, ax = plt.subplots(1, 3, figsize=(12.5, 3.9))
    ax[0].scatter(*data[labels == 1].T, s=2, c="tab:blue", alpha=0.4, label="training data (95%)")
    ax[0].scatter(*data[labels == 0].T, s=6, c="tab:red", label="training data (5%, tiny cov.)")
    ax[0].scatter(*samples.T, s=2, c="k", alpha=0.5, label="DDIM samples")
    ax[0].set_title("data and DDIM samples", fontsize=10)
    ax[0].legend(fontsize=7, loc="lower right")
    t_field = 20
    a, s = float(alphas[t_field]), float(sigmas[t_field])
    c = mu[0].tolist()
    for k, (lo, hi, title) in enumerate([((-3, -3), (3, 3), "learned score field"),
                                         ((c[0] - .3, c[1] - .3), (c[0] + .3, c[1] + .3), "zoom: memorized mode")]):
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 21), torch.linspace(lo[1], hi[1], 21), indexing="xy")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        with torch.no_grad():
            sc = model.score(pts, torch.full((len(pts), 1), a), torch.full((len(pts), 1), s))
        nrm = sc.norm(dim=1, keepdim=True)
        axk = ax[k + 1]
        if k == 0:  # unit arrows coloured by log10 ||s||
            q = axk.quiver(pts[:, 0], pts[:, 1], *(sc / nrm).T, torch.log10(nrm[:, 0]), cmap="viridis", scale=28,
                           width=0.004)
            fig.colorbar(q, ax=axk, label="log10 ||s||")
        else:  # learned vs analytic directions
            s_true, _ = analytic_score_hessian(pts.double(), w, mu, cov, a, s)
            axk.quiver(pts[:, 0], pts[:, 1], *(sc / nrm).T, color="k", scale=28, width=0.004, label="learned")
            axk.quiver(pts[:, 0], pts[:, 1], *(s_true / s_true.norm(dim=1, keepdim=True)).T, color="tab:red",
                       alpha=0.6, scale=28, width=0.004, label="analytic")
            axk.legend(fontsize=7, loc="lower right")
        axk.set_title(f"{title}, t={t_field} (sigma={s:.3f})", fontsize=10)
    _save(fig, os.path.join(out_dir, "toy_2d_score_field.png"))
    # Figure 2: Hessian eigenvalues along DDIM paths.
    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.2))
    for grp, colour in (("memorized", "tab:red"), ("non-memorized", "tab:blue")):
        for j, p in enumerate(paths[grp]):
            steps = p["steps"]
            lab = None if j else grp
            ax.plot(steps, [v[0] for v in p["learned"]], color=colour, lw=1.2, label=lab)
            ax.plot(steps, [v[1] for v in p["learned"]], color=colour, lw=0.8, ls="--")
            ax.plot(steps, [v[0] for v in p["analytic"]], color="k", lw=0.6, ls=":",
                    label="analytic mixture" if (j == 0 and grp == "memorized") else None)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("DDIM step (x_T at 0)")
    ax.set_ylabel("eigenvalues of H = grad_x s")
    ax.set_title("Hessian eigenvalues along sampling paths (solid: min, dashed: max)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, os.path.join(out_dir, "toy_2d_hessian_eigenvalues.png"))


def _round(t, digits=6):
    return [[float(f"{v:.{digits}g}") for v in row] for row in t.tolist()]


def _save(fig, path):
    from PIL import Image
    fig.tight_layout()
    small = io.BytesIO()  # a 256-colour palette keeps the committed figures small
    Image.open(io.BytesIO(figure_png(fig, dpi=80))).convert("RGB").quantize(256).save(small, format="PNG", optimize=True)
    atomic_write_bytes(path, small.getvalue())


@guarded(memory_hint="use a smaller --num_data, --batch_size, --num_samples or --mc_samples")
def main(argv=None):
    args = parse_args(argv)
    prepare_dir(args.out_dir)
    quiet_library_warnings()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the MLP's initial weights
    alphas, sigmas = schedule()
    w, mu, cov = mixture(args.mem_ratio, args.mem_std)
    data, labels = sample_mixture(args.num_data, w, mu, cov, gen=gen, exact_counts=True)
    model = ScoreMLP(args.hidden, sigma_data=float(data.std(0).mean()))
    curve = train(model, data.float(), alphas, sigmas, steps=args.train_steps, batch_size=args.batch_size,
                  lr=args.lr, second_order_weight=args.second_order_weight,
                  low_noise_fraction=args.low_noise_fraction, gen=gen)
    t_train = time.time() - t_start
    model.requires_grad_(False)

    xT = torch.randn(args.num_samples, 2, generator=gen)
    samples = ddim_sample(model, xT, alphas, sigmas, args.ddim_steps)
    radius = 10 * args.mem_std + 0.05  # a sample that ends this close to the memorized mean counts as memorized
    memorized = (samples.double() - mu[0]).norm(dim=1) < radius
    groups = {"memorized": memorized.nonzero()[:, 0][:args.num_paths].tolist(),
              "non-memorized": (~memorized).nonzero()[:, 0][:args.num_paths].tolist()}
    paths, final = {}, {}
    for grp, idx in groups.items():
        paths[grp] = []
        if not idx:
            continue
        _, ts, xs, jac = ddim_sample(model, xT[idx], alphas, sigmas, args.ddim_steps, track=True)
        learned = torch.stack([eigen_real(J)[0] for J in jac], 1)  # (P, steps, 2)
        max_imag = max(eigen_real(J)[1] for J in jac)
        # the analytic mixture's Hessian at the same points of the learned path, for reference
        analytic = torch.stack([eigen_real(analytic_score_hessian(x.double(), w, mu, cov, float(alphas[t]),
                                                                  float(sigmas[t]))[1])[0]
                                for x, t in zip(xs, ts)], 1)
        keep = sorted(set(range(0, len(ts), max(1, len(ts) // 50))) | {len(ts) - 1})  # JSON stays small
        for p in range(len(idx)):
            paths[grp].append(dict(sample=idx[p], steps=keep, timesteps=[ts[i] for i in keep],
                                   learned=_round(learned[p, keep]), analytic=_round(analytic[p, keep])))
        final[grp] = dict(learned_min_mean=float(learned[:, -1, 0].mean()),
                          analytic_min_mean=float(analytic[:, -1, 0].mean()),
                          learned_max_mean=float(learned[:, -1, 1].mean()), max_abs_imag_along_path=max_imag)
    rows = check_trace_identities(model, w, mu, cov, alphas, sigmas, args.trace_steps, args.mc_samples, gen)
    plots(args.out_dir, data, labels, samples, model, w, mu, cov, alphas, sigmas, paths)

    frac = float(memorized.double().mean())
    print(f"trained {args.train_steps} steps in {t_train:.1f} s; final loss {curve[-1]['loss']:.3f} "
          f"(DSM {curve[-1]['dsm']:.3f})")
    print(f"DDIM ({args.ddim_steps} steps): {frac:.1%} of {args.num_samples} samples in the memorized mode "
          f"(its weight {args.mem_ratio:.0%})")
    for grp, f in final.items():
        print(f"Hessian eigenvalues at the last DDIM step, {grp}: learned min {f['learned_min_mean']:.4g}, "
              f"max {f['learned_max_mean']:.4g}; analytic min {f['analytic_min_mean']:.4g}")
    print("trace identities (Monte Carlo LHS vs RHS):")
    for r in rows:
        if r["lemma"] == "4.3" and not r["gaussian"]:
            continue  # Lemma 4.3 is stated for Gaussians only
        print(f"  t={r['t']:>3} {r['distribution']:<19} {r['score']:<8} Lemma {r['lemma']}: "
              f"{r['lhs']:.5g} vs {r['rhs']:.5g} (rel. diff {r['rel_diff']:+.2%}, z {r['z']:+.2f})")
    out = os.path.join(args.out_dir, "toy_2d.json")
    write_sidecar(out, vars(args), **dict(
        seconds=dict(train=t_train, total=time.time() - t_start),
        data=dict(weights=w.tolist(), means=mu.tolist(), covariances=cov.tolist(),
                  counts=[int((labels == 0).sum()), int((labels == 1).sum())], components=["memorized", "broad"]),
        loss_curve=curve, memorized_fraction=frac, memorized_radius=radius, final_step_eigenvalues=final,
        eigenvalue_paths=paths,
        trace_identities=rows))
    print(f"saved {out}, toy_2d_score_field.png, toy_2d_hessian_eigenvalues.png ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
