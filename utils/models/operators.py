"""The score Jacobian of a diffusers UNet as a matrix-free operator on flattened latents (forward-mode JVPs).

For the score s(x, c) = grad_x log p_t(x | c) the Jacobian J = grad_x s is the Hessian H of log p_t, so its
eigenvalues describe the sharpness of the learned density at x_t (Jeon et al., 2025). A learned score is not an
exact gradient, hence J need not be symmetric: arnoldi() takes J as it is, lanczos() takes (J + J^T)/2.
"""
import torch
from torch.func import jvp, vjp

from .autodiff import forward_ad
from .denoisers import score_difference

BRANCHES = ("cond", "uncond", "delta")


def branch_score_fn(model, t, cond, which="cond"):
    """x (B, C, H, W) -> the score whose Jacobian we probe, (B, C, H, W).

    model: utils.models.denoisers.Denoiser; cond: Conditioning of B rows. which='cond' or 'uncond' runs the model
    on that branch only (half the cost of the pair); 'delta' runs both branches in one batch and returns
    s(x, c) - s(x, uncond).
    """
    if which == "delta":
        pair = model.pair_score_fn(t, cond)
        return lambda x: score_difference(pair(x))
    if which not in BRANCHES:
        raise ValueError(f"which must be one of {BRANCHES}, got {which!r}")
    return model.branch_score_fn(t, cond, which)


class ScoreJacobian:
    """J = grad_x s(x, c) (which="cond"), grad_x s(x, uncond) ("uncond") or H_delta = J_cond - J_uncond ("delta")
    at one latent x (1, C, H, W), as an operator on flattened vectors of n = C*H*W entries.

    model: utils.models.denoisers.Denoiser; t: timestep; cond: a Conditioning of one row.
    Calling the object maps v (n,) -> J v (n,) with ONE forward-mode JVP (through one UNet branch, or for 'delta'
    through both branches in one batch, like the detection metric); rmatvec(u) = J^T u uses one reverse-mode VJP
    (its graph is built once and reused); symmetrized() is v -> (J v + J^T v) / 2 for Lanczos; dense() stacks
    JVPs into the n x n matrix.
    Vectors come back in out_dtype (float64 by default, for the Krylov solvers) on the UNet's device.
    """

    def __init__(self, model, t, cond, x, *, which="cond", out_dtype=torch.float64):
        if x.shape[0] != 1 or len(cond) != 1:
            raise ValueError(f"expected one latent (1, C, H, W) and a Conditioning of one row, got "
                             f"{tuple(x.shape)} and {len(cond)} rows")
        self.model, self.t, self.cond, self.x = model, t, cond, x.detach()
        self.which, self.out_dtype = which, out_dtype
        self.shape = tuple(x.shape[1:])
        self.n = int(x[0].numel())
        self.fn = branch_score_fn(model, t, cond, which)
        self._vjp_fn = None

    def _to_latent(self, v, batch=1):
        return torch.as_tensor(v).reshape(batch, *self.shape).to(device=self.x.device, dtype=self.x.dtype)

    def __call__(self, v):
        """J v for a flat vector v (n,) -> (n,)."""
        with torch.no_grad(), forward_ad(self.x):
            _, tangent = jvp(self.fn, (self.x,), (self._to_latent(v),))
        return tangent.reshape(-1).to(self.out_dtype)

    def rmatvec(self, u):
        """J^T u for a flat vector u (n,) -> (n,), by a reverse-mode VJP."""
        if self._vjp_fn is None:
            with torch.enable_grad():
                _, self._vjp_fn = vjp(self.fn, self.x)
        (g,) = self._vjp_fn(self._to_latent(u))
        return g.reshape(-1).detach().to(self.out_dtype)

    def symmetrized(self):
        """The operator v -> (J v + J^T v) / 2 (symmetric, for Lanczos)."""
        return lambda v: 0.5 * (self(v) + self.rmatvec(v))

    def dense(self, chunk=64):
        """The full n x n Jacobian (out_dtype), column block by column block: a batch of `chunk` copies of x with
        unit tangents is one batched JVP (the UNet treats batch entries independently)."""
        cols = []
        eye = torch.eye(self.n, dtype=self.x.dtype, device=self.x.device)
        for start in range(0, self.n, chunk):
            b = min(chunk, self.n - start)
            fn = branch_score_fn(self.model, self.t, self.cond.rows([0] * b), self.which)
            xs = self.x.expand(b, *self.shape).contiguous()
            with torch.no_grad(), forward_ad(xs):
                _, tangent = jvp(fn, (xs,), (eye[start:start + b].reshape(b, *self.shape),))
            cols.append(tangent.reshape(b, -1).to(self.out_dtype))
        return torch.cat(cols).T.contiguous()


def sampling_spectra(model, cond, latents, *, steps=(0,), k=10, krylov_dim=None,
                     num_inference_steps=50, guidance_scale=7.5, which="cond", method="arnoldi", dense=False,
                     start_seed=0):
    """Leading-k eigenvalues of the score Jacobian H(x_t, c) of one prompt at chosen DDIM sampling steps.

    model: utils.models.denoisers.Denoiser (its scheduler's timesteps are set here); cond: Conditioning of the
    prompt (one row); latents: (1, C, H, W) initial noise x_T. Step i = 0 is x_T; between steps x advances by a
    classifier-free-guided DDIM step (eta = 0), exactly as utils.detection does; no UNet call follows the last
    measured step. method 'arnoldi' takes J as it is, 'lanczos' its symmetric part (J + J^T)/2; the Krylov start
    vector is seeded by start_seed. dense=True also forms the n x n matrix (n JVPs, batched) and its full
    spectrum. Returns one dict per measured step: step, timestep, sigma, the KrylovResult `krylov`, its leading k
    Ritz values `eigenvalues` (complex128 (<=k,)), and `dense_eigenvalues` (all n, by decreasing magnitude) or None.
    """
    from ..eigen import leading_eigenvalues

    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[0] < 0 or steps[-1] >= num_inference_steps:
        raise ValueError(f"steps must lie in [0, {num_inference_steps - 1}], got {steps}")
    timesteps = model.timesteps(num_inference_steps, device=latents.device)
    embeds = cond
    x, out = latents, []
    for i, t in enumerate(timesteps[:steps[-1] + 1]):
        xin = model.scale_input(x, t)
        if i in steps:
            _, sigma = model.alpha_sigma(t)
            op = ScoreJacobian(model, t, embeds, xin, which=which)
            matvec = op if method == "arnoldi" else op.symmetrized()
            res, top = leading_eigenvalues(matvec, op.n, k, krylov_dim=krylov_dim, method=method,
                                           seed=start_seed, device=latents.device)
            full = None
            if dense:
                J = op.dense()
                full = torch.linalg.eigvals(J) if method == "arnoldi" else torch.linalg.eigvalsh(0.5 * (J + J.T))
                full = full.to(torch.complex128)
                full = full[torch.argsort(full.abs(), descending=True, stable=True)].cpu()
            out.append(dict(step=i, timestep=int(t), sigma=float(sigma), krylov=res,
                            eigenvalues=top.to(torch.complex128).cpu(), dense_eigenvalues=full))
        if i < steps[-1]:
            with torch.no_grad():
                x = model.guided_step(model.pair(xin, t, embeds), t, x, guidance_scale)
    return out
