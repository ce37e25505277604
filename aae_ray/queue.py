"""The order in which a person labels the unlabeled pool, most useful images first.

The detector scores every pool image by Hotelling's T2 of its latent code (higher = more suspicious); a person then
labels the pool page by page in the browser. Labels are expensive, so the first pages should be the most useful ones.
Each policy says what "useful" means:

- ``highest``: the most suspicious first (T2 descending): finds defects fastest when they are rare and distinct.
- ``diverse``: suspicious but different from each other, so near-duplicates of one defect do not fill a page.
- ``uncertain``: closest to the threshold first, where a label most likely moves the threshold or flips a call.

Pure numpy: no torch, so the UI can order a queue without the training stack.
"""

from __future__ import annotations

import math

import numpy as np

POLICIES = ("highest", "diverse", "uncertain")

MIN_CANDIDATES = 200  # diverse: the default candidate set is max(MIN_CANDIDATES, CANDIDATE_SHARE * pool), capped
CANDIDATE_SHARE = 0.05
T2_FLOOR = np.finfo(np.float64).tiny  # uncertain: t2 / threshold floors here, so t2 <= 0 sits farthest below


def queue_order(
    t2: np.ndarray,
    codes: np.ndarray | None,
    threshold: float,
    policy: str = "highest",
    *,
    candidates: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices into the pool, in the order a person should label them (every index exactly once).

    t2: (N,) finite T2 of each pool image. codes: (N, d) latent codes, required for ``diverse`` (checked for shape
    whenever given). threshold: the T2 above which an image counts as an anomaly, finite and > 0 for ``uncertain``
    (the other policies ignore it). candidates: ``diverse`` only, how many of the highest-T2 images to reorder for
    diversity (default min(N, max(200, 5% of N))); the rest follow by T2 descending. seed: unused, every policy is
    deterministic; kept so a randomised policy can be added without changing callers.

    Ties are broken deterministically: by T2 descending, then by index ascending.
    """
    del seed  # no policy draws random numbers
    if policy not in POLICIES:
        raise ValueError(f"unknown queue policy {policy!r}; expected one of {', '.join(POLICIES)}")
    t2 = np.asarray(t2, dtype=np.float64)
    if t2.ndim != 1:
        raise ValueError(f"t2 must be 1-D (one score per pool image), got shape {t2.shape}")
    if not np.all(np.isfinite(t2)):
        raise ValueError("t2 must be finite (no NaN or inf)")
    n = len(t2)
    if codes is not None:
        codes = np.asarray(codes, dtype=np.float64)
        if codes.ndim != 2 or len(codes) != n:
            raise ValueError(f"codes must have shape (len(t2), d) = ({n}, d), got {codes.shape}")
    if policy == "diverse":
        if codes is None:
            raise ValueError("policy 'diverse' needs the latent codes (codes=None given)")
        if not np.all(np.isfinite(codes)):
            raise ValueError("codes must be finite (no NaN or inf)")
        if candidates is not None and (isinstance(candidates, bool) or int(candidates) != candidates or candidates < 1):
            raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
    if policy == "uncertain" and not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"policy 'uncertain' needs a finite threshold > 0, got {threshold!r}")
    if n == 0:
        return np.empty(0, dtype=np.intp)

    by_t2 = np.argsort(-t2, kind="stable")  # T2 descending, ties by index ascending
    if policy == "highest":
        return by_t2
    if policy == "uncertain":
        # |log(t2) - log(threshold)| taken as |log(t2 / threshold)|: the same number, but exact ratios such as 2 and
        # 1/2 give exactly equal closeness, so the tie-break decides them rather than rounding. A ratio that
        # underflows is floored like t2 <= 0: astronomically far below the threshold either way.
        with np.errstate(over="ignore", under="ignore"):  # an overflow to inf is simply farthest above
            closeness = np.abs(np.log(np.maximum(t2 / threshold, T2_FLOOR)))
        return np.lexsort((np.arange(n), -t2, closeness)).astype(np.intp)  # last key is the primary one
    k = default_candidates(n) if candidates is None else min(int(candidates), n)
    head = by_t2[:k]
    return np.concatenate([head[_k_center(_standardise(codes)[head])], by_t2[k:]])


def default_candidates(n: int) -> int:
    """How many of the highest-T2 images ``diverse`` reorders in a pool of n: min(n, max(200, 5% of n))."""
    return min(n, max(MIN_CANDIDATES, math.ceil(CANDIDATE_SHARE * n)))


def _standardise(codes: np.ndarray) -> np.ndarray:
    """z-score each latent dimension over the whole pool, so no dimension dominates the distances by its scale alone.

    The pool, not the candidates, is the reference: the candidates are the unusual images, and their own spread
    would stretch exactly the dimensions in which they are unusual. A constant dimension is only centred."""
    std = codes.std(0)
    return (codes - codes.mean(0)) / np.where(std > 0, std, 1.0)


def _k_center(z: np.ndarray) -> np.ndarray:
    """Greedy k-center over rows already sorted by T2 descending, weighted by T2 rank; returns positions into z.

    The first pick is the highest-T2 row. Each next pick maximises ``min_dist * (1 - rank / k)``: min_dist is the
    distance to the nearest row picked so far, rank the row's position in the T2 order of the k rows (0 = highest).
    Ties go to the higher T2.

    Why this rule: plain k-center maximises distance alone, so its next pick is often a barely suspicious image that
    is merely far from the rest; the weight makes a row of lower T2 earn its place by a proportionally larger
    distance, and the lowest candidate needs k times the distance of the highest. It uses the rank, not T2 itself, so
    there is no scale to tune between distances and T2. A near-duplicate of a picked row (distance ~0) scores ~0 and
    sinks to the end of the candidates: one image per look-alike group comes first, its copies last.

    Cost: O(k^2 * d) time and O(k * d) memory for k rows; measured with d = 16: 0.1 s for k = 1000, 0.2 s for
    k = 2000, 1.8 s for k = 5000. Correct for any k, but it grows as k^2: tens of seconds near k = 20,000.
    """
    k = len(z)
    weight = (k - np.arange(k)) / k  # 1 for the highest T2 down to 1 / k for the lowest
    order = np.empty(k, dtype=np.intp)
    nearest = np.full(k, np.inf)  # distance of each row to its nearest picked row
    remaining = np.arange(k)  # positions not yet picked, kept in T2 order
    pick = 0
    for step in range(k):
        order[step] = pick
        remaining = remaining[remaining != pick]
        if len(remaining) == 0:
            break
        diff = z[remaining] - z[pick]
        nearest[remaining] = np.minimum(nearest[remaining], np.sqrt(np.einsum("ij,ij->i", diff, diff)))
        pick = remaining[np.argmax(nearest[remaining] * weight[remaining])]  # first maximum: the highest T2
    return order
