"""From the detection pass to files: one progress-log record per prompt and metric, and the metric's result
(utils.results) assembled from its records once every prompt is done."""
import math
import os
import resource

import torch

from ..results import write_detection_result

COST_NOTE = ("unet_forwards, jvps, vae_decodes, seconds and peak_bytes (CUDA allocator peak; None on CPU) count every "
             "unit of work this metric used; units shared with the metrics in shared_with ran once and are counted in "
             "full for each of them")


def prompt_record(index, prompt, values, extras, cost, seconds, batch, forward_seconds):
    """The progress-log record of one prompt and one metric. values: (n generations, steps) tensor; cost: the
    metric's CostMeter summary for the batch of `batch` prompts (shared by them: divided per prompt);
    forward_seconds: one pair forward's mean seconds in this batch."""
    return dict(index=index, prompt=prompt, per_generation=values.T.tolist(), seconds=seconds,
                unet_forwards=cost["unet_forwards"], jvps=cost["jvps"], batch=batch, extras=extras,
                cost=dict(cost, seconds=cost["seconds"] / batch, step_seconds=[v / batch for v in cost["step_seconds"]],
                          forward_seconds=None if forward_seconds is None else forward_seconds / batch))


def forward_seconds(meter):
    """Mean seconds of one pair forward of a batch (K prompts; per prompt: divide by K): the unit of the cost
    ratios, one UNet forward on the [uncond; cond] batch of a prompt's 2n rows."""
    f = [u[2] for u in meter.units if u[0] == "unet_forwards"]
    return sum(f) / len(f) if f else None


def save_result(base, records, prompts, arguments, *, metric, model_id, prediction_type, identity, batch_size,
                family=None):
    """Write the metric's result (<base>.pt, <base>.json) from its records in prompt order; `metric` is the
    sidecar's metric description. Prints one summary line. Returns the [prompts, steps] tensor."""
    per_step = torch.tensor([[_mean(step) for step in r["per_generation"]] for r in records], dtype=torch.float32)
    write_detection_result(
        base, per_step, arguments, prompts=prompts, per_generation=[r["per_generation"] for r in records],
        metric=metric, extras=[r.get("extras") for r in records], model_id=model_id, prediction_type=prediction_type,
        identity=identity, family=family,
        cost=dict(seconds_per_prompt=[r["seconds"] for r in records],
                  unet_forwards_per_prompt_batch=records[0]["unet_forwards"],
                  jvps_per_prompt_batch=records[0]["jvps"], batch_size=batch_size,
                  per_prompt=[r.get("cost") or {} for r in records],
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, note=COST_NOTE))
    bad = int((~torch.isfinite(per_step)).any(dim=1).sum())
    finite = per_step[torch.isfinite(per_step)]
    print(f"saved {base}.pt {tuple(per_step.shape)}: mean {finite.mean().item() if finite.numel() else float('nan'):.4g}"
          f"{f', {bad} prompt(s) NaN' if bad else ''}")
    return per_step


def output_base(out_dir, stem, metric, n):
    """Path stem of a metric's result files (sharpness keeps the reference's name)."""
    return os.path.join(out_dir, f"{stem}_gen{n}" if metric == "sharpness" else f"{stem}_{metric}_gen{n}")


def _mean(values):
    """Mean over generations; NaN if any generation is non-finite (never averaged away silently)."""
    return sum(values) / len(values) if all(math.isfinite(v) for v in values) else float("nan")
