"""Exact cosine k-nearest-neighbour search and solo-learn's weighted kNN classifier, chunked and device-agnostic.

:func:`knn_search` returns, for every query, the ``k`` gallery items of highest cosine similarity, **exactly**: the
result is that of a brute-force search in the *exact dtype* (float64 if an input is float64, else float32), whatever
shortcut is taken.

How it stays fast and exact (the FAISS "refine" idea, with a proof instead of a heuristic margin):

1. A coarse pass multiplies the normalised queries and gallery in a cheap dtype, **bfloat16** on a CPU with AMX
   (fast bf16 matmul with float32 accumulation) and the exact dtype otherwise (on CUDA too: its bf16 GEMMs may
   reduce in reduced precision, which would void the bound; TF32 is accounted for when enabled), in query chunks
   whose (chunk x gallery) similarity block stays under ``memory_budget`` bytes, into one reused buffer.
2. The gallery columns are partitioned into blocks of 16 (strided: columns j, j + nb, ...); per row the
   ``k + margin`` blocks with the largest maxima are kept (int16 maxima of the bf16 bits, two-level top-k).
3. Every coarse similarity b is within a rigorous bound E(b) of the exact cosine (rounding of both inputs, measured
   per vector; accumulation; rounding of the output). With t_k the k-th largest block maximum the exact k-th
   similarity is >= L = t_k - E(t_k); everything outside the kept blocks is <= tau (the last kept maximum), so if
   tau + E(tau) < L the exact top k lies in the kept blocks (the row is *certified*). Rows that are not get more
   blocks from the same coarse block of similarities, and rows that still are not are recomputed over the whole
   gallery in the exact dtype.
4. Inside the kept blocks only the entries with b + E(b) >= L can reach the top k; those (a few more than k) are
   rescored in the exact dtype by one sampled dense-dense product over their ragged pattern, and the top k taken.

:func:`knn_classify` is solo-learn's ``WeightedKNNClassifier`` (cosine): each of the k neighbours votes for its label
with weight ``exp(sim / T)``; the class with the largest total wins (ties -> lowest class id). With ``k=1`` it is exact
nearest-neighbour classification.

Neighbours can be excluded per query with ``train_groups`` / ``query_groups``: gallery item j is never a neighbour of
query i when ``train_groups[j] == query_groups[i]`` (pass instance ids to exclude same-instance neighbours, or
``arange`` ids to exclude self-matches when the gallery is the query set). Groups < 0 never match.

Ties between exactly equal similarities are broken arbitrarily (as by any top-k). Memory stays at about
``memory_budget`` plus one coarse and one exact copy of the normalised gallery and queries.
"""
from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from typing import NamedTuple

import torch

__all__ = ["KNNResult", "knn_search", "knn_classify", "weighted_vote", "fast_bf16_matmul"]

log = logging.getLogger("viewssl.eval.knn")

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk's coarse similarity block (plus masks)
_BLOCK = 16  # columns per block in the block-max top-k pre-selection


class KNNResult(NamedTuple):
    """``similarities`` (M, k) cosines in the exact dtype, descending; ``indices`` (M, k) int64 gallery rows, -1
    where a query has fewer than k admissible neighbours (its similarity is then -inf)."""

    similarities: torch.Tensor
    indices: torch.Tensor


@functools.lru_cache(maxsize=None)
def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` is a CPU with AMX-bf16, where bf16 matmul (float32 accumulation) is several times faster."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_has_amx_bf16() and torch.backends.mkldnn.is_available()
    return False


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}[dtype]


def _prepare(x: torch.Tensor, exact: torch.dtype, coarse: torch.dtype, device: torch.device, pad_to: int):
    """Unit rows in the exact dtype (N, D), unit rows in the coarse dtype padded with zero rows (pad_to, D), and a
    per-row upper bound on ``||exact unit row - coarse row||`` (N,) float64."""
    n, d = x.shape
    unit = torch.empty(n, d, dtype=exact, device=device)
    low = torch.zeros(pad_to, d, dtype=coarse, device=device) if coarse != exact else None
    resid = torch.zeros(n, dtype=torch.float64, device=device)
    step = max(1, (8 * 2**20) // max(1, d * 4))  # cache-sized steps: each is read a few times
    for s in range(0, n, step):
        e = min(n, s + step)
        xe = x[s:e].to(device=device, dtype=exact)
        torch.div(xe, torch.linalg.vector_norm(xe, dim=1, keepdim=True).clamp_min(1e-30), out=unit[s:e])
        if low is not None:
            low[s:e] = unit[s:e]
            # unit - low is exact in the exact dtype (low is unit rounded to fewer bits); its norm to ~d ulps.
            r = torch.linalg.vector_norm(unit[s:e] - low[s:e], dim=1).double()
            resid[s:e] = r * (1 + 2 * d * _unit_roundoff(exact))
    if low is None:
        low = unit if pad_to == n else torch.cat([unit, unit.new_zeros(pad_to - n, d)])
    return unit, low, resid


def _block_size(n_pad: int, width: int) -> int:
    """Largest power-of-two block (<= _BLOCK columns) leaving at least 2 * width blocks per row (1: plain columns)."""
    b = _BLOCK
    while b > 1 and n_pad // b < 2 * width:
        b //= 2
    return b


def _topk_two_level(keys: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys.topk(width, dim=1)`` (values, indices; as a set: ties may pick other members) through super-blocks of 4
    strided keys when rows are long: the width largest keys lie in the width super-blocks with the largest maxima."""
    r, nb = keys.shape
    if nb % 4 or nb < 16 * width:
        return keys.topk(width, dim=1)
    ns = nb // 4
    sup = keys.view(r, 4, ns).amax(1).topk(width, dim=1).indices  # (r, width)
    members = (sup[:, None, :] + torch.arange(4, device=keys.device)[None, :, None] * ns).reshape(r, 4 * width)
    vals, pos = torch.gather(keys, 1, members).topk(width, dim=1)
    return vals, torch.gather(members, 1, pos)


def _top_blocks(sims: torch.Tensor, width: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` blocks with the largest maxima in each row of (R, Npad), and those maxima (R, width) float64,
    descending. Block j holds the ``block`` columns j, j + nb, j + 2 nb, ... (nb = Npad / block): any partition
    works for the selection argument, and this one reduces over a non-innermost axis, which vectorises (about 5x
    faster than maxima over contiguous runs of 16). For 16-bit floats the maxima are taken on the raw int16 bit
    patterns (about 3x faster again): that orders non-negative values correctly and puts every negative value below
    every non-negative one, so rows whose width-th maximum is negative are redone with a float reduction."""
    r, n_pad = sims.shape
    view = sims.view(r, block, n_pad // block)
    if sims.dtype in (torch.bfloat16, torch.float16):
        keys, top = _topk_two_level(sims.view(torch.int16).view(r, block, n_pad // block).amax(1), width)
        maxima = keys.view(sims.dtype).double()
        neg = (keys[:, -1] < 0).nonzero().squeeze(1)
        if neg.numel():
            fv, ft = view[neg].float().amax(1).topk(width, dim=1)
            top[neg], maxima[neg] = ft, fv.double()
        return top, maxima
    vals, top = _topk_two_level(view.amax(1), width)
    return top, vals.double()


def _floor_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` that is <= ``x`` (float64), elementwise: round to nearest, then step one ulp
    down (on the integer bit pattern) where that rounded up."""
    y = x.to(dtype)
    if dtype == torch.float64:
        return y
    up = y.double() > x
    if not up.any():
        return y
    int_type = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    bits = y.view(int_type)
    step = torch.where(y > 0, bits - 1,
                       torch.where(y < 0, bits + 1, torch.full_like(bits, torch.iinfo(int_type).min + 1)))
    return torch.where(up, step.view(dtype), y)


def _tier(sims, q, train_unit, width, k, block, bound: "_ErrorBound", q_resid, n):
    """Candidates from the ``width`` best blocks of each row, a certificate, and exact rescoring of the candidates
    that can still be in the top k. Returns (ok (R,) bool, top-k exact values (R, k), their columns (R, k)).

    With t_k the k-th largest block maximum, every one of the k best blocks holds a value >= t_k, so the exact k-th
    similarity v_k >= L = t_k - E(t_k). Entries outside the selected blocks are <= tau (the width-th block maximum),
    so their exact similarity is <= tau + E(tau): if that is < L no entry outside can be in the exact top k (``ok``).
    Inside the selected blocks only entries with b + E(b) >= L can reach v_k; those (a few more than k) are rescored
    in the exact dtype with one sampled dense-dense product over their ragged pattern.
    """
    r, n_pad = sims.shape
    nb = n_pad // block
    top, maxima = _top_blocks(sims, width, block)
    eps = bound.eps(q_resid)
    u = bound.u_out / (1 - bound.u_out)
    t_k, tau = maxima[:, k - 1], maxima[:, -1]
    # (-inf maxima: rows with fewer than k / width admissible blocks; keep them -inf rather than 0 * inf = nan)
    low = torch.where(torch.isfinite(t_k), t_k - eps - u * t_k.abs(), t_k)
    high = torch.where(torch.isfinite(tau), tau + eps + u * tau.abs(), tau)
    ok = (high < low) | torch.isneginf(tau) | torch.as_tensor(width >= nb, device=sims.device)
    vals = torch.gather(sims.view(r, block, nb), 2, top[:, None, :].expand(r, block, width)).reshape(r, block * width)
    # b + E(b) >= low  <=>  b >= b* (b + E(b) is increasing): solve per row, widen by a hair for the float32 compare.
    num = low - eps
    b_star = torch.where(num >= 0, num / (1 + u), num / (1 - u))
    thr = _floor_to(b_star, vals.dtype)  # compared in the coarse dtype: no conversion pass over the values
    window = (vals >= thr[:, None]) & (vals != -math.inf)
    rows, pos = window.nonzero().unbind(1)  # row-major: rows ascending
    cols = top[rows, pos % width] + (pos // width) * nb
    lens = window.sum(1)
    crow = torch.zeros(r + 1, dtype=torch.long, device=sims.device)
    torch.cumsum(lens, 0, out=crow[1:])
    if sims.device.type != "cpu":  # CSR wants increasing columns within a row (the CPU kernel does not care)
        order = torch.argsort(rows * n_pad + cols)
        rows, cols = rows[order], cols[order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), dtype=q.dtype, device=q.device),
                                          size=(r, n), check_invariants=False)
        exact = torch.sparse.sampled_addmm(pattern, q, train_unit.T, beta=0.0).values()
    slot = torch.arange(cols.numel(), device=sims.device) - crow[rows]
    width_out = max(k, int(lens.max()) if r else k)
    dense = torch.full((r, width_out), -math.inf, dtype=q.dtype, device=sims.device)
    dense_cols = torch.full((r, width_out), -1, dtype=torch.long, device=sims.device)
    dense[rows, slot] = exact
    dense_cols[rows, slot] = cols
    v, p = dense.topk(k, dim=1)
    return ok, v, torch.gather(dense_cols, 1, p)


class _ErrorBound:
    """Rigorous bound on |coarse similarity - exact cosine| for a query/gallery pair.

    Sources: rounding of the unit vectors to the coarse dtype (Cauchy-Schwarz on the measured residual norms r_q and
    r_x: |q.x - q~.x~| <= r_q (1 + r_x) + r_x), accumulation in at least float32 (gamma_D * sum |q~_i x~_i| <=
    gamma_D (1 + r_q)(1 + r_x)), the exact dtype's own rounding (``slack``), and rounding of the output to the coarse
    dtype, relative: E(b) = eps(r_q) + u_out |b| / (1 - u_out).
    """

    def __init__(self, train_resid: torch.Tensor, d: int, coarse: torch.dtype, exact: torch.dtype,
                 device: torch.device):
        low_precision = coarse in (torch.bfloat16, torch.float16)
        u_acc = 2.0**-53 if coarse == torch.float64 else 2.0**-24
        self.gamma = d * u_acc / (1 - d * u_acc)
        self.r_x = float(train_resid.max()) if train_resid.numel() else 0.0
        self.r_extra = 0.0
        if device.type == "cuda" and coarse == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            self.r_extra = 2.0**-11  # TF32 rounds the inputs to 11 significant bits inside the matmul
            self.r_x += self.r_extra
        self.u_out = _unit_roundoff(coarse) if low_precision else 0.0
        self.slack = 2 * d * _unit_roundoff(exact) + 1e-12

    def eps(self, query_resid: torch.Tensor) -> torch.Tensor:
        r_q = query_resid + self.r_extra
        return r_q * (1 + self.r_x) + self.r_x + self.gamma * (1 + r_q) * (1 + self.r_x) + self.slack

    def total(self, query_resid: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """E for coarse values ``b`` (R, W) of queries with residuals (R,)."""
        return self.eps(query_resid)[:, None] + self.u_out * b.abs() / (1 - self.u_out)


def knn_search(
    train_features: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    *,
    train_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    coarse_dtype: torch.dtype | str | None = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    margin: int | None = None,
) -> KNNResult:
    """Top-``k`` cosine neighbours of each query among the gallery; (N, D), (M, D) -> :class:`KNNResult`.

    The answer is that of a brute-force search in the *exact dtype* (float64 if either input is float64, else
    float32): the same neighbours and similarities up to float rounding (~1e-7 in float32), whatever ``coarse_dtype``
    is. Runs on ``query_features.device``. ``coarse_dtype``: ``"auto"`` (bf16 where :func:`fast_bf16_matmul`, else
    the exact dtype), a dtype, or ``None`` (the exact dtype: plain chunked brute force). Zero vectors have cosine 0.
    """
    if train_features.dim() != 2 or query_features.dim() != 2:
        raise ValueError("knn_search expects (N, D) and (M, D) feature matrices")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"feature widths differ: {train_features.shape[1]} vs {query_features.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, x in (("gallery", train_features), ("query", query_features)):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        if bad:  # a NaN row has no similarity: it would lose every comparison and push -1 into the neighbours
            raise ValueError(f"knn_search: {bad} {name} feature row(s) hold NaN or inf")
    device = query_features.device
    n, d = train_features.shape
    m = query_features.shape[0]
    k = int(k)
    k_eff = min(k, n)
    exact = torch.float64 if torch.float64 in (train_features.dtype, query_features.dtype) else torch.float32
    sims_out = torch.full((m, k), -math.inf, dtype=exact, device=device)
    idx_out = torch.full((m, k), -1, dtype=torch.long, device=device)
    if m == 0 or n == 0:
        return KNNResult(sims_out, idx_out)
    if (train_groups is None) != (query_groups is None):
        raise ValueError("pass both train_groups and query_groups, or neither")
    if train_groups is not None:
        train_groups = torch.as_tensor(train_groups, device=device).long()
        query_groups = torch.as_tensor(query_groups, device=device).long()
        # Negative groups never match: give them ids no other row can have.
        train_groups = torch.where(train_groups < 0, torch.full_like(train_groups, -1), train_groups)
        query_groups = torch.where(query_groups < 0, torch.full_like(query_groups, -2), query_groups)

    if coarse_dtype == "auto":
        coarse_dtype = torch.bfloat16 if fast_bf16_matmul(device) and exact == torch.float32 else None
    coarse = exact if coarse_dtype is None else coarse_dtype
    low_precision = coarse in (torch.bfloat16, torch.float16)
    if margin is None:
        margin = k_eff + 12 if low_precision else 4
    kc = min(n, k_eff + int(margin))
    tiers = [kc] + ([min(n, k_eff + 4 * int(margin) + 16)] if kc < n else [])  # numbers of blocks per row
    n_pad = -(-n // 128) * 128  # whole blocks of 16 and super-blocks of 4 blocks

    train_unit, train_low, train_resid = _prepare(train_features, exact, coarse, device, n_pad)
    query_unit, query_low, query_resid = _prepare(query_features, exact, coarse, device, m)
    train_low_t = train_low.T.contiguous()
    del train_low

    bound = _ErrorBound(train_resid, d, coarse, exact, device)
    bytes_per = torch.finfo(coarse).bits // 8 + (1 if train_groups is not None else 0)
    chunk = int(max(1, min(m, memory_budget // max(1, n_pad * bytes_per))))
    buf = torch.empty(chunk, n_pad, dtype=coarse, device=device)
    fallback_rows, tier_rows = 0, [0] * len(tiers)
    clock = _Clock(log.isEnabledFor(logging.DEBUG))
    clock("prepare")
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        c = e - s
        q = query_unit[s:e]
        sims = buf[:c]
        torch.mm(query_low[s:e], train_low_t, out=sims)
        clock("coarse matmul")
        if n_pad != n:
            sims[:, n:] = -math.inf
        if train_groups is not None:
            sims[:, :n].masked_fill_(query_groups[s:e, None] == train_groups[None, :], -math.inf)
        ex_vals = torch.empty(c, k_eff, dtype=exact, device=device)
        ex_idx = torch.empty(c, k_eff, dtype=torch.long, device=device)
        rows = torch.arange(c, device=device)
        # Tier 1: the k + margin best blocks of every row; tier 2: more blocks for the rows tier 1 could not
        # certify; then the whole gallery, exactly, for what is left.
        for t, width in enumerate(tiers):
            every = rows.numel() == c
            tier_rows[t] += int(rows.numel())
            block = _block_size(n_pad, width)
            ok, v, idx = _tier(sims if every else sims[rows], q if every else q[rows], train_unit, width, k_eff,
                               block, bound, query_resid[s:e] if every else query_resid[s:e][rows], n)
            ex_vals[rows], ex_idx[rows] = v, idx
            clock("select + refine")
            rows = rows[~ok]
            if rows.numel() == 0:
                break
        if rows.numel():
            fallback_rows += int(rows.numel())
            full = q[rows] @ train_unit.T
            if train_groups is not None:
                full.masked_fill_(query_groups[s:e][rows, None] == train_groups[None, :], -math.inf)
            fv, fi = full.topk(k_eff, dim=1)
            ex_vals[rows], ex_idx[rows] = fv, fi
            clock("fallback")
        ex_idx = torch.where(torch.isneginf(ex_vals), torch.full_like(ex_idx, -1), ex_idx)
        sims_out[s:e, :k_eff] = ex_vals
        idx_out[s:e, :k_eff] = ex_idx
    if clock.enabled:
        log.debug("knn_search %dx%d k=%d coarse=%s chunk=%d: tier rows %s (widths %s), %d full fallbacks; %s",
                  m, n, k_eff, coarse, chunk, tier_rows, tiers, fallback_rows, clock.summary())
    return KNNResult(sims_out, idx_out)


class _Clock:
    """Accumulated wall time per phase, only when debugging (CPU ops are synchronous; on CUDA it syncs)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.totals: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if not self.enabled:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.3f}s" for k, v in self.totals.items())


def weighted_vote(
    similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """solo-learn's cosine vote: class scores ``sum_j exp(sim_j / T) [label_j == c]``; (M, k), (M, k) -> (M, C).

    Neighbours with label < 0 or similarity -inf do not vote. The exponent is shifted by each row's maximum
    (which leaves the argmax unchanged) so small temperatures do not overflow.
    """
    sims = similarities.double()
    valid = (neighbor_labels >= 0) & torch.isfinite(sims)
    shift = torch.where(valid, sims, torch.full_like(sims, -math.inf)).amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    w = torch.where(valid, torch.exp((sims - shift) / temperature), torch.zeros_like(sims))
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    scores.scatter_add_(1, neighbor_labels.clamp_min(0).long(), w)
    return scores


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    *,
    num_classes: int | None = None,
    train_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    return_scores: bool = False,
    **search_kwargs,
):
    """Weighted kNN classification with cosine similarity (solo-learn); returns predicted labels (M,) int64.

    ``train_labels`` (N,) int (labels < 0 never vote). With ``return_scores`` also returns the (M, C) vote scores
    (row-max-shifted exp weights). A query with no admissible neighbour is predicted -1.
    """
    train_labels = torch.as_tensor(train_labels, device=query_features.device).long()
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_labels.shape[0]} labels for {train_features.shape[0]} gallery features")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1 if train_labels.numel() else 1
    if train_labels.numel() == 0:  # an empty gallery: no query has a neighbour
        pred = torch.full((query_features.shape[0],), -1, dtype=torch.long, device=query_features.device)
        return (pred, torch.zeros(len(pred), max(1, num_classes), device=pred.device)) if return_scores else pred
    res = knn_search(
        train_features, query_features, k, train_groups=train_groups, query_groups=query_groups, **search_kwargs
    )
    labels = torch.where(res.indices >= 0, train_labels[res.indices.clamp_min(0)], torch.full_like(res.indices, -1))
    scores = weighted_vote(res.similarities, labels, max(1, num_classes), temperature)
    pred = scores.argmax(dim=1)
    pred = torch.where((labels >= 0).any(dim=1), pred, torch.full_like(pred, -1))
    return (pred, scores) if return_scores else pred
