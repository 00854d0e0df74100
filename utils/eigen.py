"""Krylov eigen-solvers and stochastic trace estimators for matrix-free operators.

An operator is a callable ``matvec(v) -> A v`` on flattened vectors of length n (any device; the solvers keep
their Krylov basis in float64 on the device of the start vector and cast what the operator returns). The score
Jacobian J = grad_x s(x, c) of a diffusion model (utils/operators.py) is such an operator: it equals the Hessian
H = grad_x^2 log p_t(x | c) of the model's log-density, whose large negative eigenvalues mark memorization.
"""
from typing import NamedTuple

import torch


class KrylovResult(NamedTuple):
    """What arnoldi() and lanczos() return, with the same types on every path (also after an early breakdown).

    eigenvalues: (m,) Ritz values sorted by decreasing magnitude; complex128 from arnoldi, float64 from lanczos.
    residuals: (m,) float64 residual norms ||A y - theta y|| of the unit Ritz vectors (exactly 0 after breakdown).
    basis: (n, m) float64 orthonormal Krylov basis Q.
    projection: (m, m) float64 matrix Q^T A Q (upper Hessenberg for arnoldi, tridiagonal for lanczos).
    breakdown: True when the Krylov space closed (became A-invariant) after m steps, m <= num_steps (m < num_steps
        is the early breakdown; m = n always closes); the Ritz values are then exact eigenvalues of A.
    """
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    basis: torch.Tensor
    projection: torch.Tensor
    breakdown: bool


def _start(v0, num_steps):
    v = v0.detach().reshape(-1).to(torch.float64)
    n = v.numel()
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the start vector must be finite and non-zero")
    return v / norm, n, min(int(num_steps), n)


def _apply(matvec, q):
    w = matvec(q)
    w = torch.as_tensor(w).reshape(-1).to(device=q.device, dtype=torch.float64)
    if w.numel() != q.numel():
        raise ValueError(f"the operator returned {w.numel()} entries for a vector of {q.numel()}")
    if not torch.isfinite(w).all():
        raise FloatingPointError("the operator returned non-finite values")
    return w


def _sorted_by_magnitude(values, vectors):
    order = torch.argsort(values.abs(), descending=True, stable=True)
    return values[order], vectors[:, order]


def arnoldi(matvec, v0, num_steps, *, reorthogonalize=True, breakdown_tol=1e-10):
    """Arnoldi iteration: Ritz values of a (non-symmetric) operator from an m-step Krylov space K_m(A, v0).

    matvec: v (n,) -> A v (n,); v0: start vector (any shape, n entries); num_steps: Krylov dimension m (capped
    at n). reorthogonalize=True runs classical Gram-Schmidt twice ("twice is enough": orthogonal to working
    precision); False runs one modified Gram-Schmidt pass, the textbook Arnoldi. The iteration stops early when
    the new direction's norm falls below breakdown_tol times ||A q_j|| (an invariant subspace was found).
    Returns a KrylovResult; its extreme Ritz values converge first, so take a few more steps than eigenvalues
    wanted and check `residuals`.
    """
    q, n, m = _start(v0, num_steps)
    Q = torch.zeros(n, m + 1, dtype=torch.float64, device=q.device)
    H = torch.zeros(m + 1, m, dtype=torch.float64, device=q.device)
    Q[:, 0] = q
    steps, breakdown = m, False
    for j in range(m):
        w = _apply(matvec, Q[:, j])
        scale = w.norm()
        if reorthogonalize:
            for _ in range(2):
                h = Q[:, :j + 1].T @ w
                w = w - Q[:, :j + 1] @ h
                H[:j + 1, j] += h
        else:
            for i in range(j + 1):
                h = torch.dot(Q[:, i], w)
                w = w - h * Q[:, i]
                H[i, j] = h
        beta = w.norm()
        H[j + 1, j] = beta
        if beta <= breakdown_tol * scale or beta == 0:
            steps, breakdown = j + 1, True
            break
        Q[:, j + 1] = w / beta
    Hm = H[:steps, :steps]
    values, vectors = torch.linalg.eig(Hm)
    values, vectors = _sorted_by_magnitude(values, vectors)
    # ||A Q y - theta Q y|| = |h_{m+1,m}| |e_m^T y| for a unit eigenvector y of H_m (Arnoldi relation).
    tail = 0.0 if breakdown else float(H[steps, steps - 1])
    residuals = (tail * vectors[steps - 1, :].abs()).to(torch.float64)
    return KrylovResult(values.to(torch.complex128), residuals, Q[:, :steps].clone(), Hm.clone(), bool(breakdown))


def lanczos(matvec, v0, num_steps, *, full_reorthogonalization=True, breakdown_tol=1e-10):
    """Symmetric Lanczos iteration: Ritz values of a symmetric operator from an m-step Krylov space.

    Same arguments as arnoldi(); the operator must be symmetric (e.g. the symmetrized score Jacobian
    (J + J^T)/2 of utils.operators). full_reorthogonalization=True re-orthogonalizes every new vector against
    the whole basis (twice), which prevents the spurious repeated ("ghost") Ritz values of the plain three-term
    recurrence. Returns a KrylovResult with real eigenvalues and a tridiagonal projection.
    """
    q, n, m = _start(v0, num_steps)
    Q = torch.zeros(n, m + 1, dtype=torch.float64, device=q.device)
    alphas = torch.zeros(m, dtype=torch.float64, device=q.device)
    betas = torch.zeros(m, dtype=torch.float64, device=q.device)
    Q[:, 0] = q
    steps, breakdown = m, False
    for j in range(m):
        w = _apply(matvec, Q[:, j])
        scale = w.norm()
        alphas[j] = torch.dot(Q[:, j], w)
        w = w - alphas[j] * Q[:, j]
        if j > 0:
            w = w - betas[j - 1] * Q[:, j - 1]
        if full_reorthogonalization:
            for _ in range(2):
                w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        beta = w.norm()
        betas[j] = beta
        if beta <= breakdown_tol * scale or beta == 0:
            steps, breakdown = j + 1, True
            break
        Q[:, j + 1] = w / beta
    off = betas[:steps - 1]
    T = torch.diag(alphas[:steps]) + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(T)
    values, vectors = _sorted_by_magnitude(values, vectors)
    tail = 0.0 if breakdown else float(betas[steps - 1])
    residuals = (tail * vectors[steps - 1, :].abs()).to(torch.float64)
    return KrylovResult(values.to(torch.float64), residuals, Q[:, :steps].clone(), T, bool(breakdown))


def _probes(n, num_samples, distribution, generator, device):
    if num_samples < 2:
        raise ValueError("num_samples must be >= 2 (the standard error needs two probes)")
    if distribution == "rademacher":
        z = torch.randint(0, 2, (num_samples, n), generator=generator, dtype=torch.int64).to(torch.float64)
        return (2 * z - 1).to(device)
    if distribution == "gaussian":
        return torch.randn(num_samples, n, generator=generator, dtype=torch.float64).to(device)
    raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def _mean_and_stderr(samples):
    samples = torch.stack(samples)
    return float(samples.mean()), float(samples.std(unbiased=True) / samples.numel() ** 0.5)


def hutchinson_trace(matvec, n, num_samples, *, generator=None, distribution="rademacher", device="cpu"):
    """Hutchinson's estimator of tr A: the mean of z^T A z over random probes z with E[z z^T] = I.

    Probes are Rademacher (+-1, the minimum-variance choice; Var z^T A z = 2 sum_{i!=j} S_ij^2 for
    S = (A + A^T)/2) or standard Gaussian (Var = 2 ||S||_F^2). generator: a torch.Generator (CPU) for
    reproducibility. Returns (estimate, standard error of the mean), both floats.
    """
    z = _probes(n, num_samples, distribution, generator, device)
    return _mean_and_stderr([torch.dot(zi, _apply(matvec, zi)) for zi in z])


def hutchinson_trace_cubed(matvec, n, num_samples, *, symmetric=False, generator=None, distribution="rademacher",
                           device="cpu"):
    """Hutchinson's estimator of tr A^3: the mean of z^T A^3 z over random probes z.

    Three operator applications per probe; symmetric=True uses (A z)^T A (A z) = z^T A^3 z, valid only for
    symmetric A, with two. Relevant because -tr H^3 = E||H s||^2 for Gaussian densities (Lemma 4.3 of the
    paper). Returns (estimate, standard error of the mean), both floats.
    """
    z = _probes(n, num_samples, distribution, generator, device)
    vals = []
    for zi in z:
        a1 = _apply(matvec, zi)
        a2 = _apply(matvec, a1)
        vals.append(torch.dot(a1, a2) if symmetric else torch.dot(zi, _apply(matvec, a2)))
    return _mean_and_stderr(vals)


def leading_eigenvalues(matvec, n, k, *, krylov_dim=None, method="arnoldi", seed=0, device="cpu"):
    """The k largest-magnitude eigenvalues of an operator by Arnoldi (default) or Lanczos from a seeded start.

    krylov_dim defaults to min(n, max(2k, k + 20)). Returns (the KrylovResult, its leading k Ritz values).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = min(n, krylov_dim or max(2 * k, k + 20))
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    solver = {"arnoldi": arnoldi, "lanczos": lanczos}.get(method)
    if solver is None:
        raise ValueError(f"method must be 'arnoldi' or 'lanczos', got {method!r}")
    res = solver(matvec, v0, m)
    return res, res.eigenvalues[:k]


def leading_error(approx, exact, k):
    """Max abs error of k leading (largest-magnitude) approximate eigenvalues against exact ones, both sorted by
    decreasing magnitude: every one of the first k of each list is matched to the nearest of the first k + 1 of
    the other, so a complex-conjugate pair or a near-tie split at position k is not counted as an error."""
    a = torch.as_tensor(approx).to(torch.complex128).reshape(-1)
    e = torch.as_tensor(exact).to(torch.complex128).reshape(-1)
    k = min(k, a.numel(), e.numel())
    d1 = (a[:k, None] - e[None, :k + 1]).abs().min(dim=1).values.max()
    d2 = (e[:k, None] - a[None, :k + 1]).abs().min(dim=1).values.max()
    return float(torch.maximum(d1, d2))


def spectrum_summary(eigenvalue_lists):
    """Per-group statistics of leading eigenvalues (one list or tensor per prompt; real parts are used).

    Returns dict: prompts, eigenvalues (total count), nonnegative (count of real parts >= 0), most_negative_mean
    and most_negative_std (over prompts, of each prompt's smallest real part), largest_magnitude_mean.
    """
    per = [torch.as_tensor(v).to(torch.complex128).real.reshape(-1) for v in eigenvalue_lists]
    per = [v for v in per if v.numel()]
    if not per:
        return dict(prompts=0, eigenvalues=0, nonnegative=0, most_negative_mean=float("nan"),
                    most_negative_std=float("nan"), largest_magnitude_mean=float("nan"))
    mins = torch.stack([v.min() for v in per])
    return dict(prompts=len(per), eigenvalues=int(sum(v.numel() for v in per)),
                nonnegative=int(sum(int((v >= 0).sum()) for v in per)),
                most_negative_mean=float(mins.mean()),
                most_negative_std=float(mins.std(unbiased=True)) if len(per) > 1 else 0.0,
                largest_magnitude_mean=float(torch.stack([v.abs().max() for v in per]).mean()))
