"""examples/toy_2d.py: its analytic pieces, its second-order target, and a smoke run of the whole script."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "toy_2d.py")


def _toy():
    spec = importlib.util.spec_from_file_location("toy_2d", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_analytic_score_and_hessian_of_one_gaussian_are_closed_form():
    toy = _toy()
    w, mu, cov = toy.mixture(0.05, 0.01)
    a, s = 0.9, 0.3
    x, _ = toy.sample_mixture(50, w[1:] / w[1], mu[1:], cov[1:], a, s, torch.Generator().manual_seed(0))
    score, hess = toy.analytic_score_hessian(x, w[1:] / w[1], mu[1:], cov[1:], a, s)
    cinv = torch.linalg.inv(a ** 2 * cov[1] + s ** 2 * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(score, -(x - a * mu[1]) @ cinv.T, atol=1e-10)
    assert torch.allclose(hess, -cinv.expand(50, 2, 2), atol=1e-10)
    assert toy.ddim_timesteps(500)[:2] == [998, 996] and toy.ddim_timesteps(500)[-1] == 0


def test_second_order_target_has_mean_minus_sigma2_hessian_for_gaussian_data():
    """With the exact first-order eps_hat, E[I - r r^T] = sigma^2 C^-1 = -sigma^2 H: the loss's minimizer."""
    toy = _toy()
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    cov = torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=torch.float64)
    a, s, m = 0.8, 0.6, 200_000
    x0 = mu + torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    eps = torch.randn(m, 2, generator=g, dtype=torch.float64)
    xt = a * x0 + s * eps
    cinv = torch.linalg.inv(a ** 2 * cov + s ** 2 * torch.eye(2, dtype=torch.float64))
    eps_hat = s * (xt - a * mu) @ cinv.T  # E[eps | x_t] for Gaussian data
    tgt = toy.second_order_target(eps, eps_hat)
    se = tgt.std(0) / math.sqrt(m)
    assert ((tgt.mean(0) - s ** 2 * cinv).abs() < 5 * se).all()
    # the other form of the target has the same mean given x_t (but a self-reinforcing feedback in training)
    alt = (torch.eye(2, dtype=torch.float64) - eps[:, :, None] * eps[:, None, :]
           + eps_hat[:, :, None] * eps_hat[:, None, :])
    assert ((alt.mean(0) - s ** 2 * cinv).abs() < 5 * alt.std(0) / math.sqrt(m)).all()


def test_toy_script_smoke_run(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, SCRIPT, "--train_steps", "30", "--ddim_steps", "20", "--num_samples", "300",
           "--num_paths", "2", "--mc_samples", "4000", "--trace_steps", "5,100", "--out_dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trace identities" in r.stdout and "memorized mode" in r.stdout
    for name in ("toy_2d_score_field.png", "toy_2d_hessian_eigenvalues.png"):
        size = (out / name).stat().st_size
        assert 1000 < size < 200_000
    res = json.loads((out / "toy_2d.json").read_text())
    assert {"arguments", "versions", "data", "loss_curve", "memorized_fraction", "eigenvalue_paths",
            "final_step_eigenvalues", "trace_identities", "seconds"} <= set(res)
    assert res["arguments"]["train_steps"] == 30 and res["data"]["counts"] == [150, 2850]
    rows = res["trace_identities"]
    assert len(rows) == 2 * 3 * 2 * 2  # timesteps x (2 components + mixture) x (analytic, learned) x lemmas
    for r in rows:
        assert {"t", "sigma", "distribution", "score", "lemma", "lhs", "rhs", "lhs_stderr", "z"} <= set(r)
        # the analytic Gaussian identities hold exactly: Monte Carlo must agree within its error
        if r["score"] == "analytic" and r["gaussian"]:
            assert abs(r["z"]) < 5, r
    for grp, paths in res["eigenvalue_paths"].items():
        for p in paths:
            assert len(p["learned"]) == len(p["analytic"]) == len(p["steps"]) and len(p["learned"][0]) == 2


def test_toy_script_rejects_bad_arguments(tmp_path, capsys):
    toy = _toy()
    for argv, word in ((["--mem_ratio", "1.5"], "--mem_ratio"), (["--trace_steps", "5,1000"], "--trace_steps")):
        with pytest.raises(SystemExit) as e:
            toy.main(argv + ["--out_dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and word in err.splitlines()[0]
