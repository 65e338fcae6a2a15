"""What error-feedback rounding needs of a layer's Hessian H = XᵀX (X: the Linear's input over the
calibration tokens), for both of its users: w4a16 GPTQ (calib/gptq.py) and the GGML types
(calib/ggml_gptq.py, ggml_refit.py).

* `inverse_cholesky`: the upper Cholesky factor U of (H + damping)⁻¹ in a column order, float32;
* `row_losses` / `error_losses` / `quad_form` / `loss`: (w − ŵ) H (w − ŵ)ᵀ per row / per row of W − V /
  summed / summed by row slices, and `matmul_h`: W H, all with float64 results.

Why one module: Gemma 4 31B's down_proj reads a 21504-wide input. Its XᵀX is 1.85 GB in float32 and
every float64 copy of it 3.7 GB; the textbook steps (a float64 copy, an identity matrix, the damped
sum, L, (LLᵀ)⁻¹, U) held several at once, and a `--algorithm gptq` run of the 31B shapes ran out of
memory (RESULTS.md §11, eleventh round).

An input of up to `WIDE` channels (every input of Gemma 3 270M and of the test models; the attention
inputs of most Gemmas) keeps the float64 steps, bit for bit as before. A wider one (the down_proj input
of every Gemma from 1B up) is factored in float32 inside one n × n buffer: its rows filled from H in the
reversed processing order, an in-place blocked Cholesky, an in-place blocked inverse of the triangle,
and a 180° rotation, using U = R L⁻¹ R for R H_p R = L Lᵀ (R: the reversal; then
H_p⁻¹ = R L⁻ᵀ L⁻¹ R = UᵀU with U upper triangular). GPTQ implementations commonly factor in float32
(AutoGPTQ, llm-compressor); with the damping these passes use (0.3 of mean diag H for the GGML types)
the factor's float32 error is far below the rounding it guides. The products of a wide H are float32
(H as stored), one block of its columns at a time, each block's sums accumulated in float64: a row's
loss is then within 2e-7 of the float64 product's (RESULTS.md §11, twelfth round), in less than half the
time, and no block of H is cast. The losses go by row slices: the float64 difference of a big weight is
as large as H.

The wide steps use all of --threads without the count reaching a result (`threads.py`): the factor's
fill, trailing updates and inverse go by blocks of `PANEL` rows, the forms and W·H by column blocks of
H, each block a job on one torch thread, in blocks that n alone fixes. The inverse of the triangle
takes only the products below the diagonal (half of them).
"""

from __future__ import annotations

import torch

from ..errors import GemmaQuantError
from .threads import parallel_map, single_thread

WIDE = 4096  # wider inputs are factored in float32 in place, and their forms taken by column blocks
PANEL = 512  # columns per step of the in-place factorizations
BLOCK = 1 << 23  # values of H per column block of a wide product (32 MB)
SLICE = 1 << 24  # weights per row slice of a loss (128 MB per float64 difference)
MAX_DAMP_TRIES = 6


def row_losses(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """[rows] d H dᵀ (float64) for the rows d of D [rows, n] (a weight error); H [n, n]. Float64 products
    for an input up to `WIDE`; float32 ones on a wider input's column blocks (module doc), the blocks
    as jobs of `threads.parallel_map`, their sums added in block order."""
    n = H.shape[0]
    if n <= WIDE:
        D = D.double()
        return ((D @ H.double()) * D).sum(dim=1)
    D = D.float()
    step = max(1, BLOCK // n)
    parts = parallel_map(lambda c: ((D @ H[:, c:c + step].float()).double() * D[:, c:c + step].double()).sum(dim=1),
                         range(0, n, step))
    out = torch.zeros(D.shape[0], dtype=torch.float64)
    for p in parts:
        out += p
    return out


def error_losses(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """[rows] (w − v) H (w − v)ᵀ for the rows of W and V [rows, n]."""
    return row_losses(_difference(W, V, H), H)


def _difference(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """W − V in the precision of the products with H (`row_losses`)."""
    return W.double() - V.double() if H.shape[0] <= WIDE else W.float() - V.float()


def quad_form(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ) = ||X Dᵀ||² for H = XᵀX."""
    if H.shape[0] <= WIDE:  # summed whole, not by row: the sums (and the plans scored by them) as before
        D = D.double()
        return float(((D @ H.double()) * D).sum())
    return float(row_losses(D, H).sum())


def loss(W: torch.Tensor, V: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − V) H (W − V)ᵀ), W and V [rows, n], a slice of `SLICE` weights at a time (the float64
    difference of 31B's down_proj is 0.9 GB whole)."""
    rows, n = W.shape
    step = max(1, SLICE // max(n, 1))
    return sum(quad_form(_difference(W[r:r + step], V[r:r + step], H), H) for r in range(0, rows, step))


def matmul_h(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """W H as float64 (W [rows, n]): a float64 product up to `WIDE`, float32 ones on a wider input's column
    blocks (module doc), as jobs of `threads.parallel_map`."""
    n = H.shape[0]
    if n <= WIDE:
        return W.double() @ H.double()
    W = W.float()
    out = torch.empty(W.shape[0], n, dtype=torch.float64)
    step = max(1, BLOCK // n)

    def block(c):
        out[:, c:c + step] = W @ H[:, c:c + step].float()

    parallel_map(block, range(0, n, step))
    return out


def inverse_cholesky(H: torch.Tensor, damp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """U (float32, upper) with UᵀU = (H_p + λ·I)⁻¹, H_p = H in the column order `perm` (default: as is),
    λ = damp · mean(diag H_p). Inputs never seen (H_jj = 0) get H_jj = 1 first: no information, so they
    feed no error forward. The damping is raised tenfold until the factor exists (GemmaQuantError
    after `MAX_DAMP_TRIES`)."""
    n = H.shape[0]
    perm = torch.arange(n) if perm is None else perm
    for _ in range(MAX_DAMP_TRIES):
        if n <= WIDE:
            U = _factor64(H, damp, perm)
        else:
            with single_thread():  # its steps outside the jobs too: the same factor on any --threads
                U = _factor32(H, damp, perm)
        if U is not None:
            return U
        damp *= 10
    raise GemmaQuantError(f"the layer's Hessian is not positive definite even with damping {damp / 10:g}")


def seen_diagonal(diag: torch.Tensor) -> torch.Tensor:
    """diag H with the inputs never seen (H_jj = 0) at 1, as the factor takes them (act-order sorts by it)."""
    return torch.where(diag == 0, torch.ones_like(diag), diag)


def _factor64(H: torch.Tensor, damp: float, perm: torch.Tensor) -> torch.Tensor | None:
    """The float64 steps (narrow inputs), exactly as both GPTQs computed them before."""
    Hp = H.double()[perm][:, perm]
    Hp.diagonal().copy_(seen_diagonal(Hp.diagonal()))
    mean_diag = Hp.diagonal().mean().item() or 1.0
    eye = torch.eye(Hp.shape[0], dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(Hp + damp * mean_diag * eye)
    if info.item() != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U.float() if info.item() == 0 else None


def _factor32(H: torch.Tensor, damp: float, perm: torch.Tensor) -> torch.Tensor | None:
    """The float32 in-place steps (module doc): one n × n buffer besides H. Each step's products go by
    blocks of `PANEL` rows, fixed by n alone, as jobs of `threads.parallel_map`."""
    n = H.shape[0]
    rev = perm.flip(0)
    A = torch.empty(n, n, dtype=torch.float32)

    def fill(r):  # A = R H_p R, by row blocks (no second n × n copy)
        A[r:r + PANEL] = H[rev[r:r + PANEL]][:, rev].float()

    parallel_map(fill, range(0, n, PANEL))
    d = A.diagonal()
    d.copy_(seen_diagonal(d))
    mean_diag = float(d.double().mean()) or 1.0
    d.add_(damp * mean_diag)
    if not _cholesky_in_place(A):
        return None
    _tri_inverse_in_place(A)
    _rotate_in_place(A)
    return A


def _cholesky_in_place(A: torch.Tensor) -> bool:
    """A's lower triangle := L with L Lᵀ = A (A symmetric, its lower triangle read), the strict upper
    triangle zeroed: right-looking, by panels of `PANEL` columns. False if A is not positive definite."""
    n = A.shape[0]
    for k0 in range(0, n, PANEL):
        k1 = min(k0 + PANEL, n)
        Lkk, info = torch.linalg.cholesky_ex(A[k0:k1, k0:k1])
        if info.item() != 0:
            return False
        A[k0:k1, k0:k1] = Lkk
        if k1 == n:
            break
        P = torch.linalg.solve_triangular(Lkk.mT, A[k1:, k0:k1], upper=True, left=False)  # A21 L11⁻ᵀ
        A[k1:, k0:k1] = P

        def update(r0):  # A22 −= P Pᵀ, the lower triangle (and diagonal blocks) only
            r1 = min(r0 + PANEL, n)
            A[r0:r1, k1:r1] -= P[r0 - k1:r1 - k1] @ P[:r1 - k1].T

        parallel_map(update, reversed(range(k1, n, PANEL)))  # the biggest first: the threads end together
    A.tril_()
    return True


def _tri_inverse_in_place(L: torch.Tensor) -> None:
    """L (lower triangular) := L⁻¹, by panels from the last: M21 = −M22 L21 L11⁻¹, M11 = L11⁻¹. M22 is
    lower triangular, so the rows r0..r1 of M22 L21 need its columns up to r1 only (half the products)."""
    n = L.shape[0]
    starts = list(range(0, n, PANEL))
    for j0 in reversed(starts):
        j1 = min(j0 + PANEL, n)
        L11 = L[j0:j1, j0:j1].clone()
        eye = torch.eye(j1 - j0, dtype=L.dtype)
        inv11 = torch.linalg.solve_triangular(L11, eye, upper=False)
        if j1 < n:
            below = list(range(j1, n, PANEL))

            def product(r0):  # rows r0..r1 of −M22 L21 L11⁻¹ (read all before any is written)
                r1 = min(r0 + PANEL, n)
                return -((L[r0:r1, j1:r1] @ L[j1:r1, j0:j1]) @ inv11)

            blocks = parallel_map(product, reversed(below))[::-1]
            L[j1:, j0:j1] = torch.cat(blocks)
        L[j0:j1, j0:j1] = inv11


def _rotate_in_place(A: torch.Tensor) -> None:
    """A := R A R (A[i, j] ↔ A[n−1−i, n−1−j]), by row blocks."""
    n = A.shape[0]
    half = n // 2
    for r0 in range(0, half, PANEL):
        r1 = min(r0 + PANEL, half)
        top = A[r0:r1].flip(0, 1).clone()
        A[r0:r1] = A[n - r1:n - r0].flip(0, 1)
        A[n - r1:n - r0] = top
    if n % 2:
        A[half] = A[half].flip(0).clone()
