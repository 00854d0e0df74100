"""The types of the files the project reads back (sidecars, score results, progress-log records), as pydantic
models. utils.io.read_json_file and read_run_log validate against them, so a damaged or hand-edited file is one
error line naming the field, never a KeyError or TypeError deep inside a run.

Strict: no coercion ("5" is not an int); a float field accepts an int and NaN/inf (the writers emit NaN for a
failed generation). Unknown fields are allowed (older and newer files carry more). Only the fields a reader
uses are declared; validation only checks, the readers keep the parsed JSON as it is.
"""
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Loose(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class MetricInfo(_Loose):
    """A detection sidecar's metric description."""
    name: str
    direction: Literal["higher", "lower"] = "higher"
    settings: Optional[Dict[str, Any]] = None
    stem: Optional[str] = None
    gen_num: Optional[int] = None


class DetectionSidecar(_Loose):
    """DET.json beside a detect_mem.py result DET.pt (utils.results). Sidecars of the reference's naming
    (sharpness only) may lack metric; every field a comparison reads has its type here."""
    metric: Optional[MetricInfo] = None
    prompts: Optional[List[str]] = None
    shape: Optional[List[int]] = None
    values: Optional[List[List[float]]] = None
    model_id: Optional[str] = None
    identity: Optional[Dict[str, Any]] = None
    cost: Optional[Dict[str, Any]] = None
    arguments: Optional[Dict[str, Any]] = None


class DetectionRecord(_Loose):
    """One prompt's record of one metric in a detect_mem.py progress log (utils.detection.records.prompt_record):
    per_generation is (steps, n generations), every step with the same n >= 1 values."""
    index: int
    prompt: str
    per_generation: List[List[float]] = Field(min_length=1)
    seconds: float
    unet_forwards: float
    jvps: float

    @model_validator(mode="after")
    def _rectangular(self):
        n = {len(step) for step in self.per_generation}
        if n == {0} or len(n) != 1:
            raise ValueError("per_generation must hold the same number (>= 1) of values at every step")
        return self


class ScoreRow(_Loose):
    prompt: str
    status: str


class Similarity(_Loose):
    name: str


class ScoreSummary(_Loose):
    mean_similarity: Optional[float] = None
    mean_clip: Optional[float] = None
    frac_blank: Optional[float] = None


class ScoreCounts(_Loose):
    n_evaluated: int
    n_images: int


class ScoreResult(_Loose):
    """A `mitigate_eval.py score` result JSON (utils.evaluation.scoring.write_score_result): summary holds
    frac_above_<t> for every threshold t."""
    similarity: Similarity
    per_prompt: List[ScoreRow]
    thresholds: List[float]
    summary: ScoreSummary
    counts: ScoreCounts
    generation_header: Optional[Dict[str, Any]] = None
    manifest: Optional[str] = None

    @model_validator(mode="after")
    def _fractions(self):
        extra = self.summary.model_extra or {}
        for t in self.thresholds:
            v = extra.get(f"frac_above_{t:g}")
            if v is not None and not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"summary.frac_above_{t:g} is not a number")
            if f"frac_above_{t:g}" not in extra:
                raise ValueError(f"summary has no frac_above_{t:g} for threshold {t:g}")
        return self
