"""One mitigation run folder: every prompt of one setting not yet in its manifest, planned by the method (or
plainly, for a prompt a gate does not flag), sampled, decoded, its images saved and its record flushed."""
import os
import time

from tqdm import tqdm

from .. import distributed as D
from ..cli import UserError
from ..io import atomic_save_image, atomic_torch_save, safe_filename
from . import methods as MI


def run_folder(ctx, decode, prompts, method, st, setting, folder, log, shard, *, flags=None, scores=None,
               gen_seed=42, prompt_batch=1, save_latents=False):
    """Generate this process's share of the prompts of `log` not yet done, with `method` at settings `st`
    (labelled `setting`), into `folder`. decode: latents (gen_num, C, h, w) -> images; flags/scores: the gate's
    per-prompt flags and detection scores (None: mitigate every prompt); prompt_batch > 1: batched SAIL search.
    Each record is flushed when its images are saved."""
    todo = [i for i in range(len(prompts)) if i not in log.done]
    if log.done and shard.main:
        print(f"{folder}: resuming, {len(log.done)} of {len(prompts)} prompts already done")
    unreached = 0
    mine = [i for batch in D.my_batches(todo, 1, shard) for i in batch]
    if prompt_batch > 1:  # the flagged prompts' searches, K at a time
        ctx = MI.METHODS[method].batch(ctx, st, prompts, [i for i in mine if flags is None or flags[i]], prompt_batch)
    for i in tqdm(mine, desc=f"{method} {setting}".strip(), unit="prompt", disable=not mine):
        mitigate = flags is None or flags[i]
        t0 = time.time()
        plan = (MI.METHODS[method].plan if mitigate else MI.plan_none)(ctx, i, prompts[i], st)
        t1 = time.time()
        latents = MI.run_plan(ctx, plan)
        if not bool(latents.isfinite().all()):  # overflow: never saved as black images with exit 0
            raise UserError(f"prompt {i}: --method {method} {setting or '(defaults)'} produced non-finite latents "
                            "(a guidance or step size too large for this model?); nothing was saved for it")
        images = decode(latents)
        names = [safe_filename(i, prompts[i], suffix=f"_{k}.png") for k in range(len(images))]
        for name, img in zip(names, images):
            atomic_save_image(os.path.join(folder, name), img)
        if save_latents:
            atomic_torch_save(os.path.join(folder, "latents", f"{i:05d}.pt"), plan.latents.detach().float().cpu())
        rec = dict(index=i, prompt=prompts[i], images=names, method=method if mitigate else "none",
                   mitigated=mitigate, prompts_used=plan.prompts, seeds=[gen_seed], search_unet_calls=0,
                   search_backward_calls=0)
        # batched SAIL: the batch's seconds shared equally, so that the mean per prompt stays the cost per prompt
        search = (plan.record["batch_search_seconds"] / plan.record["batch_prompts"] if "batch_prompts" in plan.record
                  else t1 - t0)
        rec.update(plan.record, search_seconds=search, generate_seconds=time.time() - t1)
        if scores is not None:
            rec["detection_score"] = float(scores[i])
        if rec.get("reached_threshold") is False or rec.get("reached_target") is False:
            unreached += 1
        log.add(rec)
    if shard.main:
        print(f"{len(prompts)} prompt(s) done in {folder}" + (
            f"; {unreached} did not reach the method's threshold / target (see manifest.jsonl)" if unreached else ""))
