"""Krylov eigen-solvers, trace estimators, the JVP score-Jacobian operator, and examples/eigen_analysis.py."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from gaussian import GaussianUNet, ddim_scheduler, gaussian_embedding
from utils.eigen import (KrylovResult, arnoldi, hutchinson_trace, hutchinson_trace_cubed, lanczos, leading_error,
    leading_eigenvalues, spectrum_summary)
from utils.models.operators import ScoreJacobian, branch_score_fn, sampling_spectra
from utils.models.autodiff import forward_ad
from utils.models.denoisers import alpha_sigma
from utils.models.denoisers import denoiser
from utils.models.families import SD1
from utils.models.conditioning import Conditioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny-model JVPs are many small ops: on a shared CPU two OpenMP threads wait on each other at every op
    (measured 40x slower under load), one thread is as fast when idle. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _by_magnitude(values):
    values = torch.as_tensor(values).to(torch.complex128)
    return values[torch.argsort(values.abs(), descending=True, stable=True)]


def _matvec(A):
    return lambda v: A @ v


def _outlier_matrix(n, outliers, seed, symmetric=False):
    """A random bulk of spectral radius ~1 plus well-separated outlier eigenvalues, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(n, n, generator=g, dtype=torch.float64) / (2 * n ** 0.5)
    if symmetric:
        bulk = (bulk + bulk.T) / 2
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.zeros(n, n, dtype=torch.float64)
    d[range(len(outliers)), range(len(outliers))] = torch.tensor(outliers, dtype=torch.float64)
    return q @ (bulk + d) @ q.T


# ---------------------------------------------------------------------------------------------- Arnoldi / Lanczos

def test_arnoldi_full_space_matches_numpy_eig_on_random_nonsymmetric():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    res = arnoldi(_matvec(A), torch.randn(40, generator=g, dtype=torch.float64), 40)
    exact = _by_magnitude(np.linalg.eigvals(A.numpy()))
    assert res.eigenvalues.shape == (40,) and res.eigenvalues.dtype == torch.complex128
    assert leading_error(res.eigenvalues, exact, 40) < 1e-9 * exact.abs().max()
    Q = res.basis
    assert torch.allclose(Q.T @ Q, torch.eye(40, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q.T @ A @ Q, res.projection, atol=1e-10)  # the projection is Q^T A Q (Hessenberg)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_arnoldi_partial_space_finds_leading_outliers_with_correct_residuals(reorthogonalize):
    outliers = [6.0, -5.0, 4.0, -3.5]
    A = _outlier_matrix(120, outliers, seed=1)
    res = arnoldi(_matvec(A), torch.ones(120, dtype=torch.float64), 40, reorthogonalize=reorthogonalize)
    assert not res.breakdown and res.basis.shape == (120, 40)
    exact = _by_magnitude(torch.linalg.eigvals(A))
    assert leading_error(res.eigenvalues, exact, 4) < 1e-8
    # residual estimates |h_{m+1,m}| |e_m^T y| equal the true ||A x - theta x|| of the Ritz vectors x = Q y
    _, Y = torch.linalg.eig(res.projection)
    vals = torch.linalg.eigvals(res.projection)
    order = torch.argsort(vals.abs(), descending=True, stable=True)
    X = res.basis.to(torch.complex128) @ Y[:, order]
    true_res = (A.to(torch.complex128) @ X - X * vals[order]).norm(dim=0)
    assert torch.allclose(res.residuals, true_res.to(torch.float64), rtol=1e-6, atol=1e-9)


def test_arnoldi_early_breakdown_in_invariant_subspace_returns_same_types():
    g = torch.Generator().manual_seed(2)
    n = 30
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    B = torch.tensor([[1.0, 2.0, 0.0], [-2.0, 1.0, 0.5], [0.0, 0.3, -3.0]], dtype=torch.float64)
    blocks = torch.block_diag(B, torch.randn(n - 3, n - 3, generator=g, dtype=torch.float64))
    A = q @ blocks @ q.T
    v0 = q[:, :3] @ torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)  # inside the invariant subspace
    closed = arnoldi(_matvec(A), v0, 10)
    normal = arnoldi(_matvec(A), torch.randn(n, generator=g, dtype=torch.float64), 10)
    assert closed.breakdown and not normal.breakdown
    assert closed.eigenvalues.shape == (3,) and closed.basis.shape == (n, 3) and closed.projection.shape == (3, 3)
    assert torch.equal(closed.residuals, torch.zeros(3, dtype=torch.float64))
    for a, b in zip(closed, normal):
        assert type(a) is type(b)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.dim() == b.dim()
    assert leading_error(closed.eigenvalues, _by_magnitude(torch.linalg.eigvals(B)), 3) < 1e-12
    # the same types from the unreorthogonalized path, and an eigenvector start closes after one step
    bvals, bvecs = torch.linalg.eig(B)
    real = int(torch.argmin(bvals.imag.abs()))  # B's one real eigenvalue
    one = arnoldi(_matvec(A), q[:, :3] @ bvecs[:, real].real, 5, reorthogonalize=False)
    assert isinstance(one, KrylovResult) and one.breakdown and one.eigenvalues.dtype == torch.complex128
    assert one.eigenvalues.shape == (1,) and abs(complex(one.eigenvalues[0]) - complex(bvals[real])) < 1e-10


def test_lanczos_matches_eigvalsh_and_breaks_down_in_invariant_subspace():
    A = _outlier_matrix(100, [8.0, -7.0, 5.0], seed=3, symmetric=True)
    exact = _by_magnitude(torch.linalg.eigvalsh(A))
    full = lanczos(_matvec(A), torch.ones(100, dtype=torch.float64), 100)
    assert full.eigenvalues.dtype == torch.float64
    assert torch.allclose(torch.sort(full.eigenvalues).values, torch.linalg.eigvalsh(A), atol=1e-10)
    assert torch.allclose(full.basis.T @ full.basis, torch.eye(full.basis.shape[1], dtype=torch.float64), atol=1e-12)
    part = lanczos(_matvec(A), torch.ones(100, dtype=torch.float64), 30)
    assert leading_error(part.eigenvalues, exact, 3) < 1e-10
    assert torch.allclose(part.projection, part.projection.T)
    # start in the span of two eigenvectors: closes after two steps, exact values, same result types
    evals, evecs = torch.linalg.eigh(A)
    closed = lanczos(_matvec(A), evecs[:, 0] + 2 * evecs[:, -1], 20)
    assert closed.breakdown and closed.eigenvalues.shape == (2,)
    assert torch.allclose(torch.sort(closed.eigenvalues).values, evals[[0, -1]], atol=1e-10)
    assert all(type(a) is type(b) for a, b in zip(closed, part))


def test_leading_eigenvalues_and_summary_helpers():
    A = _outlier_matrix(60, [-9.0, 4.0], seed=4)
    res, top = leading_eigenvalues(_matvec(A), 60, 2)
    assert leading_error(top, _by_magnitude(torch.linalg.eigvals(A)), 2) < 1e-8
    assert top.real[0] < -8 and top.real[1] > 3  # the outliers, most negative first (largest magnitude)
    # a conjugate pair split at position k is not an error; a wrong value is
    assert leading_error([3 + 1j, 3 - 1j, 0.5], [3 - 1j, 3 + 1j, 0.4], 1) == 0
    assert leading_error([3.1, 0.5], [3.0, 1.0], 1) == pytest.approx(0.1)
    st = spectrum_summary([torch.tensor([-5.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0])])
    assert st["nonnegative"] == 2 and st["eigenvalues"] == 5 and st["most_negative_mean"] == pytest.approx(-4.0)


# ------------------------------------------------------------------------------------------------ trace estimators

def _hutchinson_std(S, n_probes, distribution):
    """Exact standard error of Hutchinson's mean for z^T S z, S symmetric (the estimator only sees sym(A))."""
    var = 2 * (S ** 2).sum()
    if distribution == "rademacher":
        var = var - 2 * (S.diagonal() ** 2).sum()
    return float((var / n_probes).sqrt())


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_and_trace_cubed_within_their_statistical_error(distribution):
    g = torch.Generator().manual_seed(5)
    n, probes = 40, 3000
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5 + 0.3 * torch.eye(n, dtype=torch.float64)
    sym = lambda M: (M + M.T) / 2  # noqa: E731
    est, se = hutchinson_trace(_matvec(A), n, probes, generator=torch.Generator().manual_seed(0),
                               distribution=distribution)
    sd = _hutchinson_std(sym(A), probes, distribution)
    assert abs(est - float(torch.trace(A))) < 4 * sd  # 4 standard errors of the exact variance
    assert se == pytest.approx(sd, rel=0.2)  # the reported standard error estimates it
    A3 = A @ A @ A
    est3, se3 = hutchinson_trace_cubed(_matvec(A), n, probes, generator=torch.Generator().manual_seed(1),
                                       distribution=distribution)
    sd3 = _hutchinson_std(sym(A3), probes, distribution)
    assert abs(est3 - float(torch.trace(A3))) < 4 * sd3
    assert se3 == pytest.approx(sd3, rel=0.2)
    # symmetric shortcut (A z)^T A (A z) on a symmetric matrix
    S = sym(A)
    est_s, _ = hutchinson_trace_cubed(_matvec(S), n, probes, symmetric=True,
                                      generator=torch.Generator().manual_seed(2), distribution=distribution)
    assert abs(est_s - float(torch.trace(S @ S @ S))) < 4 * _hutchinson_std(S @ S @ S, probes, distribution)


# ---------------------------------------------------------------------------------------- score-Jacobian operator

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_operator_on_gaussian_model_is_minus_inverse_variance(prediction_type):
    shape = (4, 4, 4)
    sched = ddim_scheduler(prediction_type)
    model = GaussianUNet(sched.alphas_cumprod, shape, prediction_type)
    g = torch.Generator().manual_seed(6)
    log_c, log_u = torch.randn(1, *shape, generator=g) - 3, torch.randn(1, *shape, generator=g)
    embeds = Conditioning.of(gaussian_embedding(torch.randn(1, *shape, generator=g), log_c),
                             gaussian_embedding(torch.zeros(1, *shape), log_u))
    t = 500
    alpha, sigma = alpha_sigma(sched, t)
    x = torch.randn(1, *shape, generator=g)
    inv = {w: 1 / (alpha ** 2 * lg.exp() + sigma ** 2).reshape(-1).double() for w, lg in (("cond", log_c),
                                                                                          ("uncond", log_u))}
    expected = {"cond": -inv["cond"], "uncond": -inv["uncond"], "delta": inv["uncond"] - inv["cond"]}
    v = torch.randn(64, generator=g, dtype=torch.float64)
    for which, diag in expected.items():
        op = ScoreJacobian(denoiser(model, sched), t, embeds, x, which=which)
        assert torch.allclose(op(v), diag * v, rtol=1e-4)
        assert torch.allclose(op.rmatvec(v), diag * v, rtol=1e-4)
        assert torch.allclose(op.dense(chunk=24), torch.diag(diag), rtol=1e-4, atol=1e-6)
    op = ScoreJacobian(denoiser(model, sched), t, embeds, x, which="cond")
    _, top = leading_eigenvalues(op, 64, 3, krylov_dim=64)
    assert torch.allclose(top.real, _by_magnitude(-inv["cond"]).real[:3], rtol=1e-5)


@pytest.mark.parametrize("method", ["arnoldi", "lanczos"])
def test_sampling_spectra_on_gaussian_model_at_later_steps(method):
    """The Gaussian model's H at step i is -1/(alpha_t^2 s2 + sigma_t^2) for t = timesteps[i], wherever x is."""
    shape = (4, 4, 4)
    sched = ddim_scheduler()
    model = GaussianUNet(sched.alphas_cumprod, shape)
    log_s2 = torch.linspace(-6, 0, 64).reshape(1, *shape)
    cond = gaussian_embedding(torch.ones(1, *shape), log_s2)
    uncond = gaussian_embedding(torch.zeros(1, *shape), torch.zeros(1, *shape))
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(8))
    out = sampling_spectra(denoiser(model, sched), Conditioning.of(cond, uncond), x, steps=[3, 0], k=4, krylov_dim=64, num_inference_steps=10,
                           method=method, dense=True)
    assert [o["step"] for o in out] == [0, 3]
    for o in out:
        t = int(sched.timesteps[o["step"]])
        assert o["timestep"] == t
        alpha, sigma = alpha_sigma(sched, t)
        exact = _by_magnitude(-1 / (alpha ** 2 * log_s2.exp() + sigma ** 2).reshape(-1).double())
        assert torch.allclose(o["eigenvalues"], exact[:4], rtol=1e-4)
        assert torch.allclose(o["dense_eigenvalues"].real, exact.real, rtol=1e-4)
    assert model.calls > 0


@pytest.fixture(scope="module")
def tiny():
    from utils.demo.model import tiny_pipeline
    pipe = tiny_pipeline()
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "")
    return pipe, Conditioning.of(cond, uncond), SD1.initial_latents(pipe, 1, 0)


def test_operator_matches_reverse_mode_dense_jacobian_of_tiny_unet(tiny):
    pipe, embeds, x = tiny
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[10]
    model = denoiser(pipe.unet, pipe.scheduler)
    fn = branch_score_fn(model, t, embeds, "cond")
    with forward_ad(x):  # the math kernel also has vmap rules for jacrev's batched backward
        J_rev = torch.func.jacrev(fn)(x).reshape(256, 256).double()  # reverse mode: independent of the JVPs
    op = ScoreJacobian(model, t, embeds, x, which="cond")
    scale = J_rev.norm()
    assert (op.dense(chunk=128) - J_rev).norm() < 1e-5 * scale
    g = torch.Generator().manual_seed(7)
    v, u = torch.randn(256, generator=g, dtype=torch.float64), torch.randn(256, generator=g, dtype=torch.float64)
    assert (op(v) - J_rev @ v).norm() < 1e-5 * (J_rev @ v).norm()
    assert (op.rmatvec(u) - J_rev.T @ u).norm() < 1e-5 * (J_rev.T @ u).norm()
    assert (op.symmetrized()(v) - 0.5 * (J_rev + J_rev.T) @ v).norm() < 1e-5 * (J_rev @ v).norm()
    # the learned Jacobian is far from symmetric (random weights), which is why Arnoldi is the default
    assert (J_rev - J_rev.T).norm() > 0.1 * scale
    # H_delta is the difference of the two branches' Jacobians (one JVP through the pair)
    ops = {w: ScoreJacobian(model, t, embeds, x, which=w) for w in ("uncond", "delta")}
    assert torch.allclose(ops["delta"](v), op(v) - ops["uncond"](v), rtol=1e-4, atol=1e-5 * float(op(v).norm()))


# ------------------------------------------------------------------------------------------ eigen_analysis script

def _load_script():
    spec = importlib.util.spec_from_file_location("eigen_analysis", os.path.join(ROOT, "examples",
                                                                                 "eigen_analysis.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_eigen_analysis_end_to_end_on_tiny_model(tiny, tmp_path, monkeypatch, capsys):
    script = _load_script()
    # tiny_pipeline() is seeded, so the module fixture IS what --model_id tiny builds; reuse it to save ~5 s
    import utils.demo.model
    monkeypatch.setattr(utils.demo.model, "tiny_pipeline", lambda **kw: tiny[0])
    (tmp_path / "mem.txt").write_text("a photo of a cat\n")
    (tmp_path / "nmem.txt").write_text("a red house by the sea\n")
    out = tmp_path / "out"
    argv = ["--model_id", "tiny", "--mem_path", str(tmp_path / "mem.txt"), "--nmem_path", str(tmp_path / "nmem.txt"),
            "--k", "3", "--krylov_dim", "60", "--steps", "0", "--device", "cpu", "--out_dir", str(out)]
    script.main(argv)
    printed = capsys.readouterr().out
    res = json.loads((out / "eigenvalues.json").read_text())
    assert {"arguments", "versions", "summary", "results", "latent_dim"} <= set(res)
    assert res["latent_dim"] == 256 and res["dense"] is True and len(res["results"]) == 2
    assert [r["group"] for r in res["results"]] == ["memorized", "non-memorized"]
    for r in res["results"]:
        (s,) = r["steps"]
        assert len(s["real"]) == 3 and len(s["dense_real"]) == 256
        lam1 = abs(complex(s["dense_real"][0], s["dense_imag"][0]))
        assert s["dense_max_abs_err"] < 1e-4 * max(1.0, lam1)  # Arnoldi agrees with the dense spectrum
    summ = res["summary"]["0"]
    assert set(summ) == {"memorized", "non-memorized"} and summ["memorized"]["eigenvalues"] == 3
    assert "max |Ritz - dense|" in printed and "non-negative" in printed
    assert (out / "eigenvalues.png").stat().st_size > 1000
    # resuming does no new work and rewrites the same results
    script.main(argv)
    again = json.loads((out / "eigenvalues.json").read_text())
    assert again["results"] == res["results"]
    assert len((out / "eigenvalues.progress.jsonl").read_text().splitlines()) == 3


def test_eigen_analysis_rejects_bad_steps(tmp_path, capsys):
    script = _load_script()
    with pytest.raises(SystemExit) as e:
        script.main(["--model_id", "tiny", "--mem_path", "x", "--nmem_path", "y", "--steps", "0,50"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
