"""Pure image arithmetic shared by the evaluation and the demo: unit pixel vectors and square resizing."""
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
