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
