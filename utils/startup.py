"""The start-up the scripts share: the model flags, this process's device and shard, and the model as a loaded
family profile (encode, noise, decode, denoiser). The one module above both utils.models and utils.demo: importing
it registers the bundled demo family, the 'tiny' model and the demo CLIP.
"""
import dataclasses

from . import demo  # noqa: F401  (registers the demo family, the tiny model and the demo CLIP)
from . import distributed as D
from .cli import device_name
from .models import families as F
from .models.loading import DTYPES, SD_MODELS, model_label, resolve_device, resolve_dtype, resolve_model_id


def add_model_arguments(p, dtype_default=None, dtype_help="default bfloat16 on CUDA (as the reference), float32 on CPU"):
    """The model, device and precision options every script shares (values checked when resolved)."""
    p.add_argument("--sd_ver", default="1", choices=list(SD_MODELS),
                   help="1 (SD v1.4), 2 (SD v2.0) or demo (bundled tiny model)")
    p.add_argument("--model_id", default=None,
                   help="Hub id, local folder, 'demo' or 'tiny' (random CPU model); overrides --sd_ver; its family "
                        "is read from its model_index.json")
    p.add_argument("--dtype", default=dtype_default, choices=list(DTYPES), help=dtype_help)
    p.add_argument("--device", default=None, type=device_name, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--prompt_mirror", default=None, help="folder with verified benchmark prompt files (offline)")


def start_process(device, arguments):
    """(shard, device) of this process: the device by name (default: CUDA if available); under a launcher, the
    process joins the group and every process must have the same `arguments` (JSON-able)."""
    return D.join(resolve_device(device), arguments)


@dataclasses.dataclass
class Model:
    """A loaded model: its family profile, pipeline, id, folder label, device and dtype."""
    family: object
    pipe: object
    model_id: str
    label: str
    device: object
    dtype: object

    def encode(self, prompts):
        """Conditioning of a list of K prompts (K rows, both branches)."""
        return self.family.encode(self.pipe, prompts, self.device)

    def noise(self, n, seed):
        """The pipeline's seeded initial noise (n, C, H, W), the same for every prompt."""
        return self.family.initial_latents(self.pipe, n, seed)

    def decode(self, latents):
        return self.family.decode(self.pipe, latents)

    def denoiser(self, **kwargs):
        return self.family.denoiser(self.pipe, **kwargs)

    @property
    def tokenizer(self):
        return self.family.tokenizer(self.pipe)

    def hparam(self, key, default=None):
        return self.family.hparam(key, default)


def model_id_of(sd_ver, model_id=None):
    """The model id that --sd_ver/--model_id name (no loading): for checks before any work."""
    return resolve_model_id(sd_ver, model_id)


def load_model(sd_ver, model_id, device, dtype=None):
    """The Model that --sd_ver/--model_id name, on `device` in `dtype` (a name; default by device)."""
    mid = resolve_model_id(sd_ver, model_id)
    dt = resolve_dtype(dtype, device)
    family, pipe = F.load(mid, device, dt)
    return Model(family, pipe, mid, model_label(sd_ver, model_id), device, dt)
