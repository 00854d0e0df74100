"""The detection result format: one writer, one reader, and the one rule that turns it into a score per prompt."""
import json
import math

import numpy as np
import pytest
import torch

from utils.cli import UserError
from utils.mitigation.gating import gate_prompts
from utils.results import read_detection_result, write_detection_result

VALUES = torch.tensor([[1.0, 3.0], [2.0, float("nan")], [5.0, 7.0]])
PROMPTS = ["a", "b", "c"]


def _write(base, direction="lower", model_id="m"):
    write_detection_result(str(base), VALUES, {"gen_num": 2}, prompts=PROMPTS, per_generation=[[[1.0]]] * 3,
                           metric=dict(name="tiled_l2", direction=direction), extras=[None] * 3, model_id=model_id,
                           prediction_type="epsilon", identity={"gen_num": 2}, cost={})
    return str(base) + ".pt"


def test_round_trip_and_the_score_rule_by_hand(tmp_path):
    pt = _write(tmp_path / "r_gen2")
    side = json.loads((tmp_path / "r_gen2.json").read_text())
    assert list(side)[:4] == ["metric", "shape", "prompts", "values"] and side["shape"] == [3, 2]
    assert side["arguments"] == {"gen_num": 2} and side["values"][0] == [1.0, 3.0]
    r = read_detection_result(pt, need_sidecar=True)
    assert torch.equal(r.values[[0, 2]], VALUES[[0, 2]]) and math.isnan(r.values[1, 1])
    assert r.prompts == PROMPTS and r.direction == "lower" and r.metric["name"] == "tiled_l2"
    # mean over the steps, negated because lower means memorized
    np.testing.assert_array_equal(r.scores(), [-2.0, np.nan, -6.0])
    np.testing.assert_array_equal(r.scores(1), [-1.0, -2.0, -5.0])
    np.testing.assert_array_equal(r.scores([2]), [-3.0, np.nan, -7.0])
    with pytest.raises(UserError, match="asks for step 3"):
        r.scores([3])
    # the mitigation gate reads the same scores: flagged above -4, and NaN (unknown) is flagged
    flags, scores, info = gate_prompts(PROMPTS, pt, "m", threshold=-4.0)
    np.testing.assert_array_equal(scores, r.scores())
    assert flags == [True, True, False] and info["metric"] == "tiled_l2"


def test_a_result_without_sidecar_is_the_reference_sharpness(tmp_path):
    torch.save(VALUES, tmp_path / "old_gen4.pt")
    r = read_detection_result(str(tmp_path / "old_gen4.pt"))
    assert r.sidecar is None and r.direction == "higher" and r.metric["name"] == "sharpness"
    np.testing.assert_array_equal(r.scores(), [2.0, np.nan, 6.0])
    with pytest.raises(UserError, match="no readable .json sidecar"):
        read_detection_result(str(tmp_path / "old_gen4.pt"), need_sidecar=True)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "is not a detect_mem.py result"),
    ("vector", r"\[prompts, steps\] tensor"),
    ("missing", "run detect_mem.py first"),
    ("prompts", "matching its sidecar's prompt list"),
])
def test_damaged_results_are_one_line(tmp_path, damage, message):
    pt = _write(tmp_path / "d_gen2")
    if damage == "garbage":
        (tmp_path / "d_gen2.pt").write_bytes(b"\x00not a tensor")
    elif damage == "vector":
        torch.save(torch.ones(3), pt)
    elif damage == "missing":
        (tmp_path / "d_gen2.pt").unlink()
    else:
        side = json.loads((tmp_path / "d_gen2.json").read_text())
        (tmp_path / "d_gen2.json").write_text(json.dumps(dict(side, prompts=["a"])))
    with pytest.raises(UserError, match=message) as e:
        read_detection_result(pt, need_sidecar=True)
    assert "\n" not in str(e.value)
