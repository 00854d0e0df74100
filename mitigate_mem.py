"""SAIL mitigation: search smooth initial noise for each prompt, then sample normally and save the images.

    python mitigate_mem.py --sd_ver 1 --data_path prompts/sample_mitigation.txt --gen_num 4
    python mitigate_mem.py --sd_ver 1 --data_path prompts/sample_mitigation.txt --no_mitigation   # "before"

Images go to OUT_DIR/<model>/<prompt_type>/ (with --no_mitigation: <prompt_type>_nomiti/), named
<index>_<cleaned prompt>_<k>.png; <model> is sd1, sd2 or sddemo as in the reference (with --model_id: the model's
name). manifest.jsonl there records each finished prompt (flushed at once, so a re-run resumes), run.json the
arguments and library versions.
"""
import os
import time

import torch
from tqdm import tqdm

from utils.cli import ArgumentParser, add_model_arguments, finite_float, guarded, nonneg_float, \
    positive_float, positive_int, quiet_library_warnings, seed_int, warn
from utils.io import ProgressLog, atomic_save_image, atomic_torch_save, safe_filename, sha256_file, write_sidecar
from utils.models import encode_prompts, load_pipeline, model_label, resolve_device, resolve_dtype, resolve_model_id
from utils.prompts import read_prompts, truncated_prompts
from utils.sail import FORMS, PromptBatches, SailSettings, sail_latents
from utils.scores import ScoreModel

NUM_INFERENCE_STEPS = 50  # DDIM steps, for the search's timestep and for generation (as the reference)
GUIDANCE_SCALE = 7.5      # classifier-free guidance of the final sampling


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--data_path", default="prompts/sample_mitigation.txt")
    p.add_argument("--prompt_type", default="mem", help="sub-folder name for the images (e.g. mem, nmem)")
    p.add_argument("--gen_num", type=positive_int, default=4, help="images per prompt")
    p.add_argument("--gen_seed", type=seed_int, default=42, help="first torch seed of the search / of plain sampling")
    # Hyperparameters of Algorithm 2 (paper, Appendix D)
    p.add_argument("--miti_thres", type=finite_float, default=8.2, help="l_thres; SD1 grid 7.6-9, SD2 grid 4-6")
    p.add_argument("--miti_lr", type=positive_float, default=0.05, help="Adam learning rate on the latents")
    p.add_argument("--miti_budget", type=positive_int, default=8, help="candidates optimized together")
    p.add_argument("--miti_max_steps", type=positive_int, default=10, help="Adam steps per round")
    p.add_argument("--miti_max_rounds", type=positive_int, default=100, help="rounds before giving up on a prompt")
    p.add_argument("--miti_alpha", type=nonneg_float, default=None,
                   help="weight of ||x_T|| in the loss (default 0.05 for epsilon, 0.01 for v-prediction models)")
    p.add_argument("--miti_form", default="reference", choices=FORMS,
                   help="reference: the paper's code (default); clean: Algorithm 2 as written (see README)")
    p.add_argument("--miti_prompt_batch", type=positive_int, default=1,
                   help="prompts whose SAIL searches share each UNet call (same search per prompt; results equal "
                        "within float tolerance; 1 = one prompt at a time)")
    p.add_argument("--no_mitigation", action="store_true", help="plain sampling from the seeded noise")
    p.add_argument("--save_latents", action="store_true",
                   help="also save each prompt's searched initial latents as latents/<index>.pt (float32)")
    p.add_argument("--out_dir", default="miti_outputs")
    return p.parse_args(argv)


def generate(pipe, prompt, latents, gen_num, seed):
    """Ordinary 50-step DDIM sampling with CFG; from `latents` if given, else from the noise seeded by `seed`."""
    if latents is None:
        torch.manual_seed(seed)  # the pipeline draws its noise from the global generator, as the reference
    return pipe(prompt, num_images_per_prompt=gen_num, latents=latents, num_inference_steps=NUM_INFERENCE_STEPS,
                guidance_scale=GUIDANCE_SCALE).images


@guarded
def main(argv=None):
    args = parse_args(argv)
    quiet_library_warnings()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_id = resolve_model_id(args.sd_ver, args.model_id)
    label = model_label(args.sd_ver, args.model_id)
    prompts = read_prompts(args.data_path, args.prompt_mirror)
    settings = None if args.no_mitigation else SailSettings(
        gen_num=args.gen_num, seed=args.gen_seed, thres=args.miti_thres, lr=args.miti_lr, budget=args.miti_budget,
        max_steps=args.miti_max_steps, max_rounds=args.miti_max_rounds, alpha=args.miti_alpha, form=args.miti_form,
        num_inference_steps=NUM_INFERENCE_STEPS)
    folder = os.path.join(args.out_dir, label, args.prompt_type + ("_nomiti" if args.no_mitigation else ""))
    identity = dict(model=label, model_id=model_id, data_sha256=sha256_file(args.data_path), gen_num=args.gen_num,
                    gen_seed=args.gen_seed, no_mitigation=args.no_mitigation, dtype=str(dtype), device=device.type)
    if settings is not None:
        identity["sail"] = settings.to_dict()
    log = ProgressLog(os.path.join(folder, "manifest.jsonl"), identity)
    todo = [i for i in range(len(prompts)) if i not in log.done]
    if log.done:
        print(f"resuming: {len(log.done)} of {len(prompts)} prompts already done")
    pipe = load_pipeline(model_id, device, dtype)
    model = ScoreModel(pipe.unet, pipe.scheduler)
    write_sidecar(os.path.join(folder, "run.json"), vars(args), model_id=model_id, model=label,
                  prediction_type=model.prediction_type, identity=identity)
    long_ones = truncated_prompts(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)
    if long_ones:
        warn(f"{len(long_ones)} prompt(s) exceed {pipe.tokenizer.model_max_length} tokens and are truncated")
    latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    uncond = encode_prompts(pipe, "", device)
    batched = settings and args.miti_prompt_batch > 1 and PromptBatches(
        model, lambda idx: encode_prompts(pipe, [prompts[j] for j in idx], device), uncond, latent_shape, settings,
        todo, args.miti_prompt_batch, dtype=dtype, device=device)

    failed = 0
    for i in tqdm(todo, desc="SAIL" if settings else "sample", unit="prompt", disable=not todo):
        prompt = prompts[i]
        rec = dict(index=i, prompt=prompt, seeds=[args.gen_seed], final_threshold=None, rounds=0, opt_steps=0,
                   accepted_losses=[], reached_threshold=None, search_seconds=0.0)
        latents = None
        if settings is not None:
            latents, info = batched(i) if batched else sail_latents(
                model, encode_prompts(pipe, prompt, device), uncond, latent_shape, settings, dtype=dtype, device=device)
            rec.update(seeds=info["seeds"], final_threshold=info["final_threshold"], rounds=info["rounds"],
                       opt_steps=info["opt_steps"], unet_calls=info["unet_calls"],
                       accepted_losses=[a["loss"] for a in info["accepted"]], accepted=info["accepted"],
                       filled_losses=info["filled_losses"], reached_threshold=info["reached_threshold"],
                       search_seconds=info["search_seconds"])
            if not info["reached_threshold"]:
                failed += 1
                warn(f"prompt {i + 1}: only {info['n_accepted']} of {args.gen_num} latents reached the threshold "
                     f"after {info['rounds']} rounds; the rest use the lowest-loss candidates found")
            if args.save_latents:
                atomic_torch_save(os.path.join(folder, "latents", f"{i:05d}.pt"), latents.detach().float().cpu())
        t0 = time.time()
        with torch.no_grad():
            images = generate(pipe, prompt, latents, args.gen_num, args.gen_seed)
        names = [safe_filename(i, prompt, suffix=f"_{k}.png") for k in range(len(images))]
        for name, img in zip(names, images):
            atomic_save_image(os.path.join(folder, name), img)
        rec.update(images=names, generate_seconds=time.time() - t0)
        log.add(rec)

    print(f"{len(prompts)} prompt(s) done in {folder}"
          + (f"; {failed} did not reach the threshold (see manifest.jsonl)" if failed else ""))


if __name__ == "__main__":
    main()
