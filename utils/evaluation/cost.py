"""The cost of a generation run in one unit across mitigation methods: UNet evaluations per image.

A UNet evaluation is one latent row through the UNet (a classifier-free pair call on n images is 2n rows). Plain
generation costs 2 S rows per image (S steps, both branches; a record's sample_branches, e.g. GUARD's 3, replaces
the 2). A method's search adds its records' search_unet_calls
calls of search_batch rows each, shared by the record's n images, and search_backward_calls backward passes of
search_batch rows. cost_ratio = (sampling + search forwards + 2 x search backwards) / (2 S): a backward pass counted
as two forwards (the usual rule of thumb for a network's backward pass; the seconds columns are the measured cost).
"""


def image_cost(header, records):
    """Mean per image over the records of one run: {'unet_forwards_per_image', 'unet_backwards_per_image',
    'cost_ratio'}; None values when the header has no step count or a searching record lacks its batch size (runs
    written before the fields existed)."""
    steps = header.get("num_inference_steps")
    none = dict(unet_forwards_per_image=None, unet_backwards_per_image=None, cost_ratio=None)
    if not isinstance(steps, int) or steps <= 0 or not records:
        return none
    fwd = bwd = images = 0
    for r in records:
        n = len(r.get("images") or [])
        calls, back = r.get("search_unet_calls") or 0, r.get("search_backward_calls") or 0
        batch = r.get("search_batch")
        if n == 0 or ((calls or back) and not isinstance(batch, int)):
            return none
        fwd += r.get("sample_branches", 2) * steps * n + calls * (batch or 0)
        bwd += back * (batch or 0)
        images += n
    return dict(unet_forwards_per_image=fwd / images, unet_backwards_per_image=bwd / images,
                cost_ratio=(fwd + 2 * bwd) / images / (2 * steps))
