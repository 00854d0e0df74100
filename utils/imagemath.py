"""Pure image arithmetic shared by the evaluation, the demo and NeMo (detector and mitigation): unit pixel vectors,
square resizing, per-channel min-max scaling and batched SSIM."""
import torch


def pixel_unit_vectors(x):
    """Pixel cosine features of images x (N, C, H, W): each flattened, mean-centred and L2-normalized, (N, C*H*W)
    in x's dtype. A single-colour image gives the zero vector (cosine 0 with everything), never a copy."""
    v = x.reshape(x.shape[0], -1)
    v = v - v.mean(dim=1, keepdim=True)
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-6, v / n.clamp_min(1e-30), torch.zeros_like(v))


def resize_square(x, size):
    """Images x (N, C, H, W) resized to size x size (bilinear, antialiased, in x's float dtype); as is if already."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def minmax_per_channel(d):
    """d (N, C, H, W) in float32, min-max scaled to [0, 1] per row and channel (NeMo's scaling of eps - x_T)."""
    d = d.float()
    lo, hi = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
    return (d - lo) / (hi - lo)


def ssim_pairs(x, y, kind="ms", kernel=11, betas=(0.33, 0.33, 0.33)):
    """torchmetrics' SSIM of each row pair (x[i], y[i]) of two (N, C, H, W) batches, (N,): multi-scale (kind 'ms',
    one scale per beta) or single-scale ('single'); data range from the pair's values (torchmetrics' default)."""
    from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                               structural_similarity_index_measure)
    if kind == "ms":
        return multiscale_structural_similarity_index_measure(x, y, reduction="none", kernel_size=kernel, betas=betas)
    return structural_similarity_index_measure(x, y, reduction="none", kernel_size=kernel)
