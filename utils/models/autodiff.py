"""The forward-mode-AD policy: attention kernel, autocast, and the float32 JVP copy."""
import contextlib
import copy

import torch

@contextlib.contextmanager
def forward_ad(x):
    """What a forward-mode JVP through a diffusers UNet needs, for inputs like x (a tensor):

    1. scaled-dot-product attention on the math kernel, the only one with forward-mode AD (the CPU flash kernel
       and the CUDA flash / memory-efficient kernels raise on dual tensors);
    2. on CUDA with bfloat16/float16 tensors, autocast to that dtype: some forward-AD formulas in current torch
       hand a float32 tensor to the next layer (seen on an H200: a dtype mismatch in the cross-attention's
       linear layer); autocast casts it back, so the JVP still runs in the half dtype, as the reference's did.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    half = x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
    with sdpa_kernel(SDPBackend.MATH), (torch.autocast("cuda", dtype=x.dtype) if half else contextlib.nullcontext()):
        yield


JVP_DTYPES = ("model", "float32")


def jvp_unet_copy(unet, jvp_dtype="model"):
    """None for JVPs in the model's own dtype; a float32 copy of the UNet (+4 bytes per parameter) for
    jvp_dtype='float32' when the model runs in another dtype."""
    if jvp_dtype not in JVP_DTYPES:
        raise ValueError(f"jvp_dtype must be one of {JVP_DTYPES}")
    if jvp_dtype == "float32" and next(unet.parameters()).dtype != torch.float32:
        return copy.deepcopy(unet).float()
    return None
