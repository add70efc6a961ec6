"""Logistic regression for every fold of a split at once: one L-BFGS per fold, run in lockstep.

Why: one L-BFGS iteration of one fit reads the training matrix twice (``X w`` and ``X^T r``); at
D = 3072 that is memory-bound, about 3.6 GB read per iteration for 300k cells. The folds of a split
share most of their cells, so here the K fits of a split read the split's cells together as one
(n x D) @ (D x K) product per pass: K times the useful work per byte read.

Nothing else is shared. Each fold keeps its own problem, exactly the one :class:`LogRegHead` hands to
scikit-learn: inputs standardised with the mean and sd of the fold's own training cells, objective
``mean(log-loss over its training cells) + ||w||^2 / (2 C n_train)`` (scikit-learn's lbfgs
scaling), intercept unpenalised; its own L-BFGS history, its own backtracking line search, its own
stopping rule (``max |gradient| <= tol``, scikit-learn's ``gtol``; or ``max_iter``). The objective is
strictly convex, so each fold converges to the same optimum as its separate scikit-learn fit, to
the tolerance (tested). Only the rounding is shared: BLAS rounds a float32 column of the product
differently with the product's width, so a fold solved with other folds, or alone (a resumed split,
folds that stopped earlier), ends at a point as far from it as the tolerance allows (log-odds within
about 1e-3 at 3000 x 200; AUROC within 1e-5).

Standardisation costs nothing extra: with per-fold mean ``m_k`` and sd ``s_k`` the decision
``((x - m_k) / s_k) . w_k + b_k`` is ``(x - c) . (w_k / s_k) + beta_k`` on the centred rows (``c`` a
common shift), so one centred float32 block serves every fold.

No copy of the split's rows is made: each pass reads them from the caller's matrix in blocks of a
few MiB, centred into one reused buffer, and computes ``X w``, the loss, the residuals and
``X^T r`` of a block while it is in cache (one read of the rows per pass instead of two; the
gradient's block sums are accumulated in float64). The matrix is never modified.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
from scipy.special import expit

from scdm.classify._threads import current_blas_threads, solve_threads
from scdm.classify.heads import column_moments
from scdm.store.warning_scopes import in_context

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ARMIJO = 1e-4
_MIN_STEP = 0.5 ** 40
"""A line search giving up below this step has met the float precision floor (40 halvings of the unit step)."""


@dataclass
class FoldFits:
    """Solutions of one split's logistic regressions, one row per fold (model)."""

    mean: np.ndarray
    """(K, D) float32: each fold's training mean (standardisation; zeros for ``standardize=False``)."""
    scale: np.ndarray
    """(K, D) float32: each fold's training sd."""
    coef: np.ndarray
    """(K, D) float64: weights on standardised inputs."""
    intercept: np.ndarray
    """(K,) float64."""
    n_iter: np.ndarray
    """(K,) L-BFGS iterations per fold."""
    grad_max: np.ndarray
    """(K,) max |gradient| at the solution."""
    converged: np.ndarray
    """(K,) bool: stopped by the gradient tolerance (or the float precision floor), not by max_iter."""
    decision: np.ndarray | None = None
    """(n_cells, K) float32: every fold's log-odds on every cell of the split (``decisions=True``)."""
    decision_seconds: float = 0.0
    """Time spent on :attr:`decision`."""


_BLOCK_BYTES = 4 << 20
"""Size of one block of centred rows (fits the L2/L3 cache; large enough for an efficient GEMM)."""


_GROUPS = 8
"""Partial sums of a pass: blocks in this many fixed groups (one thread takes a group at a time)."""


_MIN_RUN = 64
"""Rows of a split are centred run by run when its runs of consecutive rows are this long on average."""


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scdm-logreg")
    return _POOLS[threads]


class _Rows:
    """Rows ``rows`` of ``X`` (all rows when None) as a read-only matrix-like view: no copy of them all.

    Indexing with a slice or an integer array returns those rows (a view of ``X`` when they are
    consecutive), exactly what indexing ``X[rows]`` would; :func:`column_moments` reads it so.
    """

    def __init__(self, X: np.ndarray, rows: np.ndarray | None) -> None:
        self.X = X
        self.start: int | None = None
        self.rows: np.ndarray | None = None
        if rows is None:
            self.start, n = 0, X.shape[0]
        else:
            rows = np.asarray(rows, np.int64)
            n = rows.size
            if n and int(rows[-1]) - int(rows[0]) == n - 1 and bool((np.diff(rows) == 1).all()):
                self.start = int(rows[0])  # consecutive: blocks are views of X
            else:
                self.rows = rows
        self.shape = (n, X.shape[1])
        self.dtype = X.dtype
        # a split of a category holds whole datasets: a few long runs of consecutive rows, centred
        # run by run straight from X (a gather first, then the subtraction, reads and writes twice)
        self.runs: np.ndarray | None = None
        if self.rows is not None and n:
            starts = np.concatenate([[0], np.flatnonzero(np.diff(self.rows) != 1) + 1])
            if starts.size * _MIN_RUN <= n:
                self.runs = starts

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            lo, hi, _ = key.indices(self.shape[0])
            if self.start is not None:
                return self.X[self.start + lo:self.start + hi]
            assert self.rows is not None
            return self.X[self.rows[lo:hi]]
        if self.start is not None:
            return self.X[np.asarray(key, np.int64) + self.start]
        assert self.rows is not None
        return self.X[self.rows[key]]

    def centred(self, lo: int, hi: int, shift: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``lo:hi`` minus ``shift`` in ``out`` (float32), bit for bit ``X[rows][lo:hi] - shift``."""
        block = out[:hi - lo]
        if self.start is not None:
            np.subtract(self.X[self.start + lo:self.start + hi], shift, out=block)
        elif self.runs is not None:
            assert self.rows is not None
            first = int(np.searchsorted(self.runs, lo, side="right")) - 1
            at = lo
            for run in range(first, self.runs.size):
                if at >= hi:
                    break
                end = min(hi, int(self.runs[run + 1]) if run + 1 < self.runs.size else self.shape[0])
                source = int(self.rows[at])
                np.subtract(self.X[source:source + end - at], shift, out=block[at - lo:end - lo])
                at = end
        else:
            assert self.rows is not None
            np.take(self.X, self.rows[lo:hi], axis=0, out=block)
            block -= shift
        return block


class _Problem:
    """The K objectives on the split's rows of ``X``, centred block by block (``X`` is not modified)."""

    def __init__(self, X: np.ndarray, rows: np.ndarray | None, y: np.ndarray, train: np.ndarray, C: float,
                 standardize: bool | str, threads: int | None = None) -> None:
        view = _Rows(X, rows)
        n, dim = view.shape
        X = cast("np.ndarray", view)  # read as the split's rows: column_moments and the shift index it
        self.block_rows = max(64, _BLOCK_BYTES // max(1, dim * 4))
        starts = list(range(0, n, self.block_rows))
        per_group = -(-len(starts) // _GROUPS)
        self.groups = [starts[i:i + per_group] for i in range(0, len(starts), per_group)]
        # the groups are shared out over the math threads (numpy and BLAS release the GIL), each with its own buffer
        threads = max(1, min(threads or current_blas_threads(), len(self.groups)))
        if standardize:
            with solve_threads():  # global: constant columns add 0 to the shared scale (see heads._global_standardizer)
                self.mean, self.scale = column_moments(X, train, threads=threads,
                                                       constant_scale=0.0 if standardize == "global" else 1.0)
            if standardize == "global":  # one scale per fold: the root mean square of its centred values
                rms = np.sqrt(np.mean(np.square(self.scale.astype(np.float64)), axis=1, keepdims=True))
                self.scale = np.broadcast_to(np.where(rms > 1e-12, rms, 1.0), self.scale.shape).astype(np.float32)
        else:
            # standardize=False is solved about each fold's training mean too (scale 1): with an unpenalised
            # intercept the same objective, but L-BFGS on the embedding's own coordinates couples the intercept
            # to every weight through the columns' offsets (1e4 with sd 0.5: log-odds 0.5 sd from the optimum,
            # 9% of pairs of cells reordered). fit_logreg_folds hands the intercept back uncentred.
            with solve_threads():
                self.mean, _ = column_moments(X, train, threads=threads)
            self.scale = np.ones((train.shape[1], dim), np.float32)
        # one shift for every fold, from the rows alone: a fold's numbers do not depend on its batch-mates
        self.shift = X[np.linspace(0, n - 1, min(n, 4096)).astype(np.int64)].mean(axis=0, dtype=np.float64).astype(np.float32)
        self.rows = view
        self.buffers = [np.empty((min(self.block_rows, n), dim), np.float32) for _ in range(threads)]
        self.workers = _pool(threads) if threads > 1 else None
        self.y = y.astype(np.float32)
        self.train = train.astype(np.float32)
        self.n_train = train.sum(axis=0).astype(np.float64)
        self.delta = self.mean.astype(np.float64) - self.shift  # (K, D): each fold's mean, as seen from the shift
        self.inv_scale = 1.0 / self.scale.astype(np.float64)
        self.l2 = 1.0 / (C * self.n_train)

    def _blocks(self, starts: list[int], active: np.ndarray, v32: np.ndarray, beta32: np.ndarray, n_k32: np.ndarray,
                buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Loss sums, intercept and weight gradient sums (float64) of the blocks starting at ``starts``."""
        value = np.zeros(active.size)
        g_b = np.zeros(active.size)
        g_vt = np.zeros((v32.shape[0], active.size))  # (D, k)
        n = self.rows.shape[0]
        for lo in starts:
            hi = min(lo + self.block_rows, n)
            xc = self.rows.centred(lo, hi, self.shift, buffer)
            z = xc @ v32
            z += beta32
            mask = self.train[lo:hi][:, active]
            y = self.y[lo:hi, None]
            loss = np.logaddexp(np.float32(0), z)
            loss -= y * z
            loss *= mask
            value += loss.sum(axis=0, dtype=np.float64)
            resid = expit(z)
            resid -= y
            resid *= mask
            resid /= n_k32
            g_b += resid.sum(axis=0, dtype=np.float64)
            g_vt += xc.T @ resid  # while the block is in cache; summed in float64
        return value, g_b, g_vt

    def value_and_grad(self, active: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Objective, weight gradient and intercept gradient of the ``active`` folds at (w, b)."""
        v = w * self.inv_scale[active]  # weights on centred (unscaled) rows
        beta = b - np.einsum("kd,kd->k", self.delta[active], v)
        v32, beta32 = v.T.astype(np.float32), beta.astype(np.float32)
        n_k = self.n_train[active]
        n_k32 = n_k.astype(np.float32)
        # fixed groups of consecutive blocks, summed in order: the same bits whatever the thread count
        # one BLAS thread per block in every case: the same bits whatever the thread count
        with solve_threads():
            parts = self._parts(active, v32, beta32, n_k32)
        value, g_b, g_vt = parts[0]
        for more in parts[1:]:
            value, g_b, g_vt = value + more[0], g_b + more[1], g_vt + more[2]
        value = value / n_k
        g_v = g_vt.T  # (k, D)
        g_w = (g_v - self.delta[active] * g_b[:, None]) * self.inv_scale[active] + w * self.l2[active, None]
        value += 0.5 * self.l2[active] * np.einsum("kd,kd->k", w, w)
        return value, g_w, g_b

    def decisions(self, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """(n, K) float32: every fold's log-odds on every row, in one pass over the rows.

        The same arithmetic as the objective: ``(x - c) . (w_k / s_k) + beta_k`` on the centred rows.
        """
        v = coef * self.inv_scale
        beta = intercept - np.einsum("kd,kd->k", self.delta, v)
        v32, beta32 = np.ascontiguousarray(v.T, dtype=np.float32), beta.astype(np.float32)
        n = self.rows.shape[0]
        out = np.empty((n, coef.shape[0]), np.float32)

        def run(group: list[int], buffer: np.ndarray) -> None:
            for lo in group:
                hi = min(lo + self.block_rows, n)
                np.matmul(self.rows.centred(lo, hi, self.shift, buffer), v32, out=out[lo:hi])
                out[lo:hi] += beta32

        with solve_threads():
            self._each_group(run)
        return out

    def _each_group(self, run: Callable[[list[int], np.ndarray], T]) -> list[T]:
        """``run(group, buffer)`` for every group of blocks, in group order (side by side on the threads)."""
        if len(self.buffers) == 1:
            return [run(group, self.buffers[0]) for group in self.groups]
        free = list(self.buffers)

        def one(group: list[int]) -> T:
            buffer = free.pop()  # list.pop is atomic: one buffer per running group
            try:
                return run(group, buffer)
            finally:
                free.append(buffer)

        assert self.workers is not None
        return list(self.workers.map(in_context(one), self.groups))  # the caller's warning blocks and job cover the threads

    def _parts(self, active: np.ndarray, v32: np.ndarray, beta32: np.ndarray,
               n_k32: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The sums of each group of blocks, in group order (groups run side by side on the threads)."""
        return self._each_group(lambda group, buffer: self._blocks(group, active, v32, beta32, n_k32, buffer))


def fit_logreg_folds(X: np.ndarray, y: np.ndarray, train: np.ndarray, *, rows: np.ndarray | None = None, C: float = 1.0,
                     tol: float = 1e-4, max_iter: int = 200, standardize: bool | str = "global",
                     memory: int = 10, threads: int | None = None, decisions: bool = False) -> FoldFits:
    """Fit one L2 logistic regression per column of ``train``, every fold's next point in one pass.

    Each fold runs its own L-BFGS at its own pace: a pass evaluates, for every fold still running,
    the one point its own algorithm asks for next (a new iterate's first trial step, or a shorter
    step of its line search). A fold that backtracks therefore costs the others nothing: the number
    of passes is about the largest count of evaluations one fold needs, not the sum over iterations
    of the slowest fold's backtracks.

    Parameters
    ----------
    X : ndarray of shape (n_rows, emb_dim), float32
        The matrix holding the split's rows (not modified; no copy of the rows is made).
    y : ndarray of shape (n_cells,)
        0/1 labels of the split's cells.
    train : ndarray of shape (n_cells, n_folds), bool
        Training cells of each fold.
    rows : ndarray of shape (n_cells,), optional
        Positions of the split's cells in ``X`` (default: every row of ``X``, in order).
    C, tol, max_iter, standardize
        As :class:`scdm.classify.heads.LogRegHead`.
    memory : int, default 10
        L-BFGS history length (scipy's default).
    threads : int, optional
        Threads that share each pass over the rows, every one with one BLAS thread (default: the
        BLAS threads allowed now). The results are the same bits for any number.
    decisions : bool, default False
        Also score every cell with every fold's solution (:attr:`FoldFits.decision`), in one more
        pass over the rows: a fold's test cells are then scored together with the other folds'
        instead of in a pass of their own (the same value as the fold's head gives, up to float32
        rounding: the centred form of the objective instead of standardised rows).

    Returns
    -------
    FoldFits
    """
    X = np.asarray(X, np.float32)
    problem = _Problem(X, rows, np.asarray(y), np.asarray(train, bool), C, standardize, threads)
    k, dim = train.shape[1], X.shape[1]
    folds = _FoldStates(k, dim, memory)
    every = np.arange(k)
    f, g_w, g_b = problem.value_and_grad(every, folds.x[:, :dim], folds.x[:, dim])
    folds.f[:] = f
    folds.g[:, :dim], folds.g[:, dim] = g_w, g_b
    folds.grad_max[:] = np.abs(folds.g).max(axis=1)
    folds.converged[:] = folds.grad_max <= tol
    active = every[~folds.converged]
    folds.next_direction(active)
    while active.size:
        trial = folds.trial(active)
        value, g_w, g_b = problem.value_and_grad(active, trial[:, :dim], trial[:, dim])
        f_now = folds.f[active]
        # sufficient decrease (Armijo), and a real one: at the float precision floor a tiny step can
        # give the same value, which would stall a fold until max_iter instead of stopping it
        accept = (value <= f_now + _ARMIJO * folds.step[active] * folds.slope[active]) & (value < f_now)
        moved = active[accept]
        folds.move(moved, trial[accept], value[accept], np.concatenate([g_w[accept], g_b[accept, None]], axis=1))
        # a line search without decrease at any step means the float precision floor: stop that fold there
        stuck = folds.backtrack(active[~accept], value[~accept])
        folds.n_iter[stuck] += 1
        folds.converged[stuck] = True
        reached = moved[folds.grad_max[moved] <= tol]
        folds.converged[reached] = True
        going = moved[(folds.grad_max[moved] > tol) & (folds.n_iter[moved] < max_iter)]
        folds.next_direction(going)
        searching = active[~accept]
        active = np.sort(np.concatenate([going, searching[folds.step[searching] >= _MIN_STEP]]))
    coef, intercept = folds.x[:, :dim].copy(), folds.x[:, dim].copy()
    decision, decision_seconds = None, 0.0
    if decisions:
        t0 = time.perf_counter()
        decision = problem.decisions(coef, intercept)
        decision_seconds = time.perf_counter() - t0
    mean, scale = problem.mean, problem.scale
    if not standardize:  # solved about each fold's mean: weights on the embedding as it is, its own intercept
        intercept = intercept - np.einsum("kd,kd->k", mean.astype(np.float64), coef)
        mean = np.zeros_like(mean)
    return FoldFits(mean=mean, scale=scale, coef=coef, intercept=intercept, n_iter=folds.n_iter,
                    grad_max=folds.grad_max, converged=folds.converged, decision=decision,
                    decision_seconds=decision_seconds)


class _FoldStates:
    """Every fold's L-BFGS state: iterate, objective, gradient, search direction and line-search step."""

    def __init__(self, k: int, dim: int, memory: int) -> None:
        self.x = np.zeros((k, dim + 1))  # weights, then the intercept
        self.f = np.zeros(k)
        self.g = np.zeros((k, dim + 1))
        self.direction = np.zeros((k, dim + 1))
        self.slope = np.zeros(k)
        self.step = np.ones(k)
        self.n_iter = np.zeros(k, np.int64)
        self.grad_max = np.zeros(k)
        self.converged = np.zeros(k, bool)
        self.history = _History(memory, k, dim + 1)

    def trial(self, folds: np.ndarray) -> np.ndarray:
        """The point each fold evaluates next: its iterate plus its current step along its direction."""
        return self.x[folds] + self.step[folds, None] * self.direction[folds]

    def next_direction(self, folds: np.ndarray) -> None:
        """A new L-BFGS direction from each fold's iterate, to be tried first with a unit step."""
        if not folds.size:
            return
        grad = self.g[folds]
        direction = -self.history.apply(folds, grad)
        slope = np.einsum("kp,kp->k", grad, direction)
        uphill = slope >= 0  # a stale curvature pair: restart that fold from steepest descent
        if uphill.any():
            self.history.reset(folds[uphill])
            direction[uphill] = -grad[uphill] / np.maximum(np.linalg.norm(grad[uphill], axis=1), 1.0)[:, None]
            slope[uphill] = np.einsum("kp,kp->k", grad[uphill], direction[uphill])
        self.direction[folds], self.slope[folds] = direction, slope
        self.step[folds] = 1.0

    def move(self, folds: np.ndarray, x: np.ndarray, f: np.ndarray, g: np.ndarray) -> None:
        """Accept the trial points of ``folds`` (the Armijo condition held) and learn their curvature."""
        if not folds.size:
            return
        self.history.push(folds, self.step[folds, None] * self.direction[folds], g - self.g[folds])
        self.x[folds], self.f[folds], self.g[folds] = x, f, g
        self.n_iter[folds] += 1
        self.grad_max[folds] = np.abs(g).max(axis=1)

    def backtrack(self, folds: np.ndarray, f_trial: np.ndarray) -> np.ndarray:
        """Shorter steps for ``folds`` (their trial failed the Armijo condition); returns those that give up.

        The new step minimises the quadratic through the iterate's value and slope and the failed
        trial's value, kept within [0.1, 0.5] of the failed step (safeguarded backtracking): one
        trial instead of several halvings when the first step overshoots by far.
        """
        step, slope = self.step[folds], self.slope[folds]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            curvature = f_trial - self.f[folds] - slope * step
            best = -slope * step * step / (2.0 * curvature)
        best = np.where(np.isfinite(best), best, 0.5 * step)
        self.step[folds] = np.clip(best, 0.1 * step, 0.5 * step)
        return folds[self.step[folds] < _MIN_STEP]


class _History:
    """L-BFGS curvature pairs of every fold, each fold with its own ring position (folds move at their own pace)."""

    def __init__(self, memory: int, k: int, size: int) -> None:
        self.s = np.zeros((memory, k, size))
        self.y = np.zeros((memory, k, size))
        self.rho = np.zeros((memory, k))  # 0 marks an empty or skipped slot
        self.newest = np.full(k, memory - 1)
        self.memory = memory

    def reset(self, folds: np.ndarray) -> None:
        self.rho[:, folds] = 0.0

    def push(self, folds: np.ndarray, s: np.ndarray, y: np.ndarray) -> None:
        slot = (self.newest[folds] + 1) % self.memory
        self.newest[folds] = slot
        sy = np.einsum("kp,kp->k", s, y)
        keep = sy > 1e-10 * np.einsum("kp,kp->k", y, y)
        self.s[slot, folds], self.y[slot, folds] = s, y
        self.rho[slot, folds] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)

    def _slots(self, folds: np.ndarray) -> list[np.ndarray]:
        """Each fold's ring slots, newest first."""
        return [(self.newest[folds] - i) % self.memory for i in range(self.memory)]

    def apply(self, folds: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The inverse-Hessian approximation times ``grad`` (two-loop recursion), per fold."""
        q = grad.copy()
        order = self._slots(folds)
        alpha = []
        for slot in order:
            rho = self.rho[slot, folds]
            alpha.append(rho * np.einsum("kp,kp->k", self.s[slot, folds], q))
            q -= alpha[-1][:, None] * self.y[slot, folds]
        gamma = self._initial_scale(folds, order, grad)
        r = gamma[:, None] * q
        for slot, a in zip(reversed(order), reversed(alpha)):
            rho = self.rho[slot, folds]
            beta = rho * np.einsum("kp,kp->k", self.y[slot, folds], r)
            r += (a - beta)[:, None] * self.s[slot, folds]
        return r

    def _initial_scale(self, folds: np.ndarray, order: list[np.ndarray], grad: np.ndarray) -> np.ndarray:
        """s.y / y.y of each fold's newest kept pair; before any pair, a unit first step length."""
        gamma = np.zeros(folds.size)
        found = np.zeros(folds.size, bool)
        for slot in order:
            rho = self.rho[slot, folds]
            use = (rho > 0) & ~found
            if use.any():
                y_use = self.y[slot[use], folds[use]]
                gamma[use] = 1.0 / (rho[use] * np.einsum("kp,kp->k", y_use, y_use))
                found |= use
        first = ~found
        gamma[first] = 1.0 / np.maximum(np.linalg.norm(grad[first], axis=1), 1.0)
        return gamma
