"""The detection result: one writer (detect_mem.py) and one reader (detect_eval.py, Table 1, the mitigation gate).

A result is DET.pt, a float32 [prompts, steps] tensor (per prompt, per measured step: the mean over the n
generations, NaN if any generation was), and DET.json beside it, the sidecar that describes it (the metric's name,
direction and settings, the prompts, per-generation values, identity, cost, arguments, versions). The rule that
turns it into one score per prompt lives here once: the mean over the chosen steps, negated for a metric whose
lower values mean memorized, so a larger score always means more likely memorized.
"""
import dataclasses
import io
import os

import torch

from .cli import UserError
from .io import DataPathError, atomic_torch_save, read_json_file, read_limited, write_sidecar
from .schemas import DetectionSidecar

MAX_RESULT_BYTES = 1 << 30  # a result tensor is read whole, so its size is capped


@dataclasses.dataclass
class DetectionResult:
    """A detect_mem.py result as read back."""
    path: str
    values: torch.Tensor   # (K prompts, S measured steps), float32
    sidecar: dict = None   # the .json beside it; None when absent or unreadable (results older than sidecars)

    @property
    def metric(self):
        """The sidecar's metric description; sharpness results of the reference's naming have none."""
        m = (self.sidecar or {}).get("metric")
        return m if isinstance(m, dict) else {"name": "sharpness", "direction": "higher"}

    @property
    def direction(self):
        return self.metric.get("direction", "higher")

    @property
    def prompts(self):
        return (self.sidecar or {}).get("prompts")

    def scores(self, steps=None):
        """One score per prompt, float64 (K,): the mean over all measured steps (steps=None), the first `steps`
        (an int) or the 1-based steps listed, negated when lower means memorized. NaN stays NaN."""
        t = self.values
        if isinstance(steps, int):
            t = t[:, :steps]
        elif steps is not None:
            if max(steps) > t.shape[1]:
                raise UserError(f"{self.path} has {t.shape[1]} measured step(s); --steps asks for step {max(steps)}")
            t = t[:, [s - 1 for s in steps]]
        s = t.double().mean(dim=1).numpy()
        return -s if self.direction == "lower" else s


def sidecar_path(path):
    return os.path.splitext(path)[0] + ".json"


def read_detection_result(path, need_sidecar=False):
    """The DetectionResult at `path` (DET.pt), read safely (a regular file of at most 1 GiB, weights_only).
    A missing, damaged or wrongly shaped file is a UserError; so is a missing or unreadable sidecar, or one whose
    prompt list does not match the tensor, when `need_sidecar`."""
    try:
        data = read_limited(path, MAX_RESULT_BYTES)
    except DataPathError as e:
        raise UserError(f"{path}: {e.detail}; run detect_mem.py first") from None
    try:
        t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch raises on a damaged file
        raise UserError(f"{path} is not a detect_mem.py result ({type(e).__name__})") from None
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.dim() != 2 or t.shape[0] == 0:
        raise UserError(f"{path} does not hold a [prompts, steps] tensor")
    if t.is_complex():  # its imaginary part would be dropped with only a library warning
        raise UserError(f"{path} holds a complex tensor ({t.dtype}); a detection result is real")
    # No sidecar: a result older than sidecars. One that is there must be intact (never dropped in silence).
    side = (read_json_file(sidecar_path(path), "result sidecar", DetectionSidecar)
            if os.path.lexists(sidecar_path(path)) else None)
    if side is not None and side.get("shape") is not None and list(side["shape"]) != list(t.shape):
        raise UserError(f"{path} holds a {list(t.shape)} tensor but its sidecar says {side['shape']} (prompts, steps): "
                        "one of the two was replaced; rerun detect_mem.py")
    if need_sidecar:
        prompts = (side or {}).get("prompts")
        if side is None:
            raise UserError(f"{path} has no readable .json sidecar beside it (detect_mem.py writes both)")
        if not (isinstance(prompts, list) and len(prompts) == t.shape[0]):
            raise UserError(f"{path} does not hold a [prompts, steps] tensor matching its sidecar's prompt list")
    return DetectionResult(path, t, side)


def write_detection_result(base, values, arguments, *, metric, prompts, per_generation, extras, model_id,
                           prediction_type, identity, cost, family=None):
    """Write <base>.pt (`values`, float32 (K, S)) and then <base>.json, atomically each. `arguments` is the run's
    argument dict; `metric` its name, direction, settings, stem, gen_num and description; family: the model
    family's description (utils.models.families.describe) or None; the rest as read back."""
    atomic_torch_save(base + ".pt", values)
    write_sidecar(base + ".json", arguments, metric=metric, shape=list(values.shape), prompts=prompts,
                  values=values.tolist(), per_generation=per_generation, extras=extras, model_id=model_id,
                  prediction_type=prediction_type, identity=identity, cost=cost,
                  **({"family": family} if family else {}))



# What may differ between two results that are compared (a memorized and a non-memorized set): the prompt file.
PER_SET = ("data_sha256",)


def differences(a, b):
    """What differs between two results a comparison needs alike (list of names, [] when comparable): the
    metric's name, direction and settings, the model, and every identity field (seed, n, steps, dtype, device,
    size, options) but the prompt file's hash. Results without a sidecar (the reference's naming) have
    nothing to compare: []."""
    if a.sidecar is None or b.sidecar is None:
        return []
    out = [f"metric {k}" for k in ("name", "direction", "settings") if a.metric.get(k) != b.metric.get(k)]
    if a.sidecar.get("model_id") != b.sidecar.get("model_id"):
        out.append("model_id")
    ia, ib = a.sidecar.get("identity") or {}, b.sidecar.get("identity") or {}
    out += sorted(k for k in set(ia) | set(ib) if k not in PER_SET and k != "model_id" and ia.get(k) != ib.get(k))
    return out


def describe_differences(a, b, names):
    """One line naming each difference with both values, e.g. "gen_num 4 vs 8"."""
    def value(r, name):
        if name.startswith("metric "):
            return r.metric.get(name.split()[1])
        return r.sidecar.get("model_id") if name == "model_id" else (r.sidecar.get("identity") or {}).get(name)
    return "; ".join(f"{n} {value(a, n)!r:.60} vs {value(b, n)!r:.60}" for n in names)
