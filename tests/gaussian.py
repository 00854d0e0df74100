"""A closed-form Gaussian 'denoiser' with the UNet call signature, whose scores and Hessians are known exactly.

Each condition c is a diagonal Gaussian data distribution N(mu_c, diag(s2_c)) over latents (C, H, W). It is
encoded in the 'text embedding' itself: encoder_hidden_states (B, 2, C*H*W) holds mu_c in row 0 and log s2_c in
row 1. The noisy marginal at timestep t is N(alpha mu_c, diag(alpha^2 s2_c + sigma^2)), so
    score s(x, c) = -(x - alpha mu_c) / v_c,   Jacobian (= Hessian of log p_t) = -diag(1 / v_c),
    eps = -sigma s,   v-prediction output = alpha eps - sigma x0_hat with x0_hat = (x - sigma eps) / alpha.
"""
import types

import torch


class GaussianUNet(torch.nn.Module):
    def __init__(self, alphas_cumprod, shape=(4, 4, 4), prediction_type="epsilon"):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.shape = tuple(shape)
        self.prediction_type = prediction_type
        self.config = types.SimpleNamespace(in_channels=shape[0], sample_size=shape[1])
        self.calls = 0

    def marginal(self, t, emb):
        abar = self.alphas_cumprod[int(t)]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        mu = emb[:, 0].reshape(-1, *self.shape)
        s2 = emb[:, 1].exp().reshape(-1, *self.shape)
        return alpha, sigma, mu, alpha ** 2 * s2 + sigma ** 2

    def score(self, x, t, emb):
        alpha, sigma, mu, var = self.marginal(t, emb)
        return -(x - alpha * mu) / var

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        self.calls += 1
        alpha, sigma, mu, var = self.marginal(timestep, encoder_hidden_states)
        eps = sigma * (sample - alpha * mu) / var
        if self.prediction_type == "epsilon":
            return (eps,)
        x0 = (sample - sigma * eps) / alpha
        return (alpha * eps - sigma * x0,)


def gaussian_embedding(mu, log_s2):
    """(K, C, H, W) means and log-variances -> (K, 2, C*H*W) 'embeddings' understood by GaussianUNet."""
    return torch.stack([mu.flatten(1), log_s2.flatten(1)], dim=1)


def ddim_scheduler(prediction_type="epsilon"):
    """DDIM with Stable Diffusion v1's schedule."""
    from utils.demo.model import ddim_scheduler as sd_ddim
    return sd_ddim(prediction_type)


class GaussianFlow(torch.nn.Module):
    """The same Gaussian data N(mu_c, diag(s2_c)) under rectified flow, x = (1 - sigma) x0 + sigma eps, as a
    transformer (SD3Transformer2DModel's call signature) predicting the exact velocity v = E[eps - x0 | x]:
        marginal N((1 - sigma) mu, diag(var)), var = (1 - sigma)^2 s2 + sigma^2,
        v = k (x - (1 - sigma) mu) - mu,   dv/dx = diag(k),   k = (sigma - (1 - sigma) s2) / var.
    sigma is the scheduler's own value at the timestep (looked up in `scheduler`, taken in float64)."""

    def __init__(self, scheduler, shape=(4, 4, 4)):
        super().__init__()
        self.scheduler, self.shape = scheduler, tuple(shape)
        self.config = types.SimpleNamespace(in_channels=shape[0], sample_size=shape[1])
        self.calls = 0

    def coefficients(self, t, emb):
        """sigma, mu, var and the Jacobian diagonal k of condition rows emb (B, 2, D) at timestep t."""
        t = t.reshape(-1)[0]
        sigma = self.scheduler.sigmas[self.scheduler.index_for_timestep(t)].double()
        mu = emb[:, 0].reshape(-1, *self.shape)
        s2 = emb[:, 1].exp().reshape(-1, *self.shape)
        var = (1 - sigma) ** 2 * s2 + sigma ** 2
        return sigma, mu, var, (sigma - (1 - sigma) * s2) / var

    def velocity(self, x, t, emb):
        sigma, mu, _, k = self.coefficients(t, emb)
        return k * (x - (1 - sigma) * mu) - mu

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=False):
        self.calls += 1
        return (self.velocity(hidden_states, timestep, encoder_hidden_states),)
