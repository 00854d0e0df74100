"""The detector plug-in interface: a detector is a class with a name, a direction, a settings dataclass of its own
options and hooks that the generic pass (utils.detection.loop.run_detectors) calls at the shared model calls.

Adding a detector is one file: subclass Detector, decorate it with @register and import the file (the built-in
ones are imported by utils/detection/__init__.py). detect_mem.py makes its flags from the settings dataclass
(utils.cli.settings_arguments: the field's default and its one-line comment), its --metrics name from `name`.

The pass, per batch of K prompts x n generations (B = K*n rows): prepare() of every detector; then, along one
classifier-free-guided DDIM trajectory, at each step i one UNet call on the pair [x; x] with [uncond; cond]
embeddings, and on_step() of each detector that still measures (i < trajectory()); then the images are decoded
once if a detector wants them, and finish() of every detector. Hooks run in registration order, so the detectors'
own model calls (a JVP, one more forward) keep their order whichever detectors are requested.
"""
import contextlib
import dataclasses

import torch

from ..models import attention as A
from ..models.denoisers import score_difference

DETECTORS = {}  # name -> Detector subclass, in registration order (the built-in seven first)
DIRECTIONS = ("higher", "lower")  # which end of a detector's value means memorized
SPACES = ("output", "eps")  # the space of out(x_t, c) - out(x_t, empty): raw model output or noise prediction


def register(cls):
    """Class decorator: make the detector known by its name (to run_detectors and to detect_mem.py's --metrics)."""
    if not cls.name or cls.direction not in DIRECTIONS:
        raise ValueError(f"a detector needs a name and a direction in {DIRECTIONS}: {cls!r}")
    if not dataclasses.is_dataclass(cls.Settings):
        raise ValueError(f"{cls.name}: Settings must be a dataclass")
    DETECTORS[cls.name] = cls
    return cls


def option(default, **metadata):
    """A settings field with argparse metadata (type, choices, steps=True: at most the schedule's steps)."""
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The shared trajectory every detector measures along."""
    num_inference_steps: int = 50     # DDIM steps of the sampling schedule (the paper's 50)
    guidance_scale: float = 7.5       # CFG scale of the trajectory between measured steps

    def __post_init__(self):
        if not (isinstance(self.num_inference_steps, int) and self.num_inference_steps > 0):
            raise ValueError("num_inference_steps must be a positive integer")


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """A detector without options."""


@dataclasses.dataclass(frozen=True)
class DifferenceSpace:
    """The space of the conditional-minus-unconditional output (shared by wen and be: one flag)."""
    wen_space: str = option("output", choices=SPACES, help=(  # wen, be: raw model output or noise prediction
        "wen, be: output = raw model output as Wen et al.'s code (v for v-prediction models); eps = noise prediction "
        "(README, 'Comparing detectors')"))

    def __post_init__(self):
        if self.wen_space not in SPACES:
            raise ValueError(f"wen_space must be one of {SPACES}")


def positive_fields(settings, names):
    """ValueError unless each named field of the settings is a positive integer."""
    bad = [f"{k} must be a positive integer" for k in names
           if not (isinstance(getattr(settings, k), int) and getattr(settings, k) > 0)]
    if bad:
        raise ValueError("; ".join(bad))


@dataclasses.dataclass
class Step:
    """The shared work of sampling step i: x (B, C, H, W) the current latents, xin the scaled input, xx = [xin; xin]
    (2B, ...) and out (2B, ...) the model output on xx with [uncond; cond] embeddings, at timestep t."""
    i: int
    t: object
    x: torch.Tensor
    xin: torch.Tensor
    xx: torch.Tensor
    out: torch.Tensor
    cache: dict = dataclasses.field(default_factory=dict)  # per-step results several detectors share

    def shared(self, key, compute):
        """compute() once per step and key (e.g. the output difference wen and be both take)."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclasses.dataclass
class Pass:
    """What the detectors see of one batch: K prompts x n generations, B = K*n rows (prompt-major)."""
    model: object            # utils.models.denoisers.Denoiser
    sampling: Sampling
    timesteps: torch.Tensor  # the schedule (num_inference_steps,)
    k: int
    n: int
    embeds: object           # the Conditioning of the B rows
    prompt_lengths: object   # K token counts incl. BOS and the first EOS, or None
    meter: object            # utils.detection.loop.CostMeter
    instrument: object       # the shared CrossAttentionInstrument, or None
    values: dict             # name -> float32 tensor (rows, steps) each detector fills
    extras: dict             # name -> K per-prompt details (None: none)
    scratch: dict            # name -> the detector's state between hooks
    companions: dict = dataclasses.field(default_factory=dict)  # model id -> Denoiser of a second model (companion())

    def paused(self):
        """Context in which a detector's own model calls are not recorded by the attention instrument."""
        return self.instrument.paused() if self.instrument else contextlib.nullcontext()

    def split(self, rows):
        """Per-prompt slices [j*n:(j+1)*n] of a per-row sequence: K lists."""
        return [rows[j * self.n:(j + 1) * self.n] for j in range(self.k)]


class Detector:
    """A memorization detector; subclasses set the class attributes and override the hooks they need."""
    name = None                 # --metrics name and result file infix
    direction = "higher"        # "higher" or "lower" value = memorized
    Settings = NoSettings       # dataclass of the detector's options (one flag each in detect_mem.py)
    description = ""            # what the saved value is (the result's sidecar)
    per_prompt = False          # one value per prompt (K rows) instead of one per generation (K*n rows)
    wants_images = False        # finish() gets the decoded images (one VAE decode of the trajectory's end)
    min_generations = 1         # generations per prompt it needs
    model_options = ()          # detect_mem.py model flags that change its numbers (part of its identity)

    def __init__(self, settings=None, sampling=None):
        self.settings = settings if settings is not None else self.Settings()
        self.sampling = sampling or Sampling()

    def steps(self):
        """Columns of the result: measured steps, or 1 for a single-number detector."""
        return 1

    def trajectory(self):
        """Sampling steps (pair forwards along the trajectory) the detector needs."""
        return self.sampling.num_inference_steps

    def check(self):
        """Problems (a list of strings) of these settings with this schedule."""
        n = self.sampling.num_inference_steps
        return [f"{self.name} needs {self.trajectory()} sampling steps; the schedule has {n}"] \
            if self.trajectory() > n else []

    def identity(self):
        """The settings that change the detector's numbers (what a resumed run must match; the sidecar's)."""
        out = dict(num_inference_steps=self.sampling.num_inference_steps, guidance_scale=self.sampling.guidance_scale)
        out.update(dataclasses.asdict(self.settings))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def companion(self):
        """The id of a second model the detector compares the run's model with (curv_*_theta's earlier checkpoint),
        or None; the script loads it, checks it against the run's model and hands its Denoiser over in
        Pass.companions."""
        return None

    def check_model(self, pipe, size):
        """ValueError if the pipeline, generating images of size (height, width) px, lacks what the detector needs
        (a layer, an image size)."""

    def model_needs(self):
        """What the denoiser must carry: {'jvp': True} (a JVP UNet) or {'fd_precision': ...} (finite differences)."""
        return {}

    def attention(self, unet, prompt_lengths, n):
        """(TokenRequest or None, QueryMapRequest or None): what the shared attention instrument must record."""
        return None, None

    def prepare(self, p):
        """Before the trajectory (p: Pass); raise ValueError for inputs the detector cannot use."""

    def on_step(self, p, s):
        """At step s.i < trajectory(), after the shared pair forward (s: Step)."""

    def finish(self, p, images):
        """After the trajectory; images: K lists of n PIL images if wants_images, else None."""


def attention_layers(unet):
    """The UNet's cross-attention layers in forward order; ValueError if it has none."""
    layers = A.cross_attention_layers(unet) if hasattr(unet, "named_modules") else []
    if not layers:
        raise ValueError("the attention metrics need a UNet with cross-attention layers (diffusers Attention)")
    return layers


def output_difference(p, s, space):
    """out(x_t, c) - out(x_t, empty) (B, ...) at step s in `space` (SPACES); computed once per step for all."""
    return s.shared(("difference", space), lambda: score_difference(
        s.out if space == "output" else p.model.eps(s.out, s.xx, s.t)))
