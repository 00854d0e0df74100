"""benchmarks/bench.py's SD3 branch: a smoke run at SD3's layout with toy widths through the flow denoiser."""
import json

import pytest
import torch

from benchmarks import bench


def test_sd3_tiny_smoke_run_times_every_item_through_the_flow_denoiser(tmp_path):
    out = tmp_path / "b.json"
    res = bench.run(bench.parse_args(["--unet", "sd3_tiny", "--items", "forward,wen,jvp,jvp_chunked,fd,sail_round",
                                      "--repeats", "1", "--out", str(out),
                                      "--threads", str(torch.get_num_threads())]))  # leave the suite's threads
    items = res["runs"]["float32"]["items"]
    assert set(items) == {"forward", "wen", "jvp", "jvp_chunked", "fd"}  # no SAIL alpha for flow models: skipped
    assert all("error" not in r and r["seconds"] > 0 for r in items.values()), items
    assert json.loads(out.read_text())["runs"]["float32"]["items"].keys() == items.keys()
    assert "sd3_tiny transformer shape" in bench.markdown(res)
    with pytest.raises(SystemExit):  # the real size is GPU only
        bench.parse_args(["--unet", "sd3_medium"])
