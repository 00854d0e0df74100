"""The samplers a run may choose (--sampler): diffusers schedulers built from the pipeline's own scheduler config.

ddim is the harness's sampler (every family loads with DDIM, utils.models.families.with_ddim); dpmsolver
(DPMSolverMultistepScheduler, Jain et al.'s sampler) and euler (EulerDiscreteScheduler, Ren et al.'s and Han et
al.'s on SD v2.0) are built the way StableDiffusionPipeline users swap schedulers, `Cls.from_config(config)`, so a
run with them equals the pipeline with that scheduler (tests/test_samplers.py).
"""
import importlib

SAMPLERS = {"ddim": "DDIMScheduler", "dpmsolver": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
DEFAULT_SAMPLER = "ddim"


def build_scheduler(name, config, num_inference_steps=50):
    """A new scheduler of sampler `name` from a scheduler config (a pipeline's scheduler.config), checked by setting
    its schedule for num_inference_steps. ValueError (one sentence) for an unknown name or a config that sampler
    cannot be built from (e.g. a DEIS config's algorithm_type, an unsupported beta schedule)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    cls = getattr(importlib.import_module("diffusers"), SAMPLERS[name])
    try:
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(num_inference_steps)
    except (ValueError, NotImplementedError, TypeError, KeyError) as e:
        raise ValueError(f"the model's scheduler config cannot build the {name} sampler ({SAMPLERS[name]}): "
                         f"{' '.join(str(e).split())}") from None
    return scheduler
