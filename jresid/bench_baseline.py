"""The four residual-update metrics in plain PyTorch, from a TransformerLens cache.

This is the workflow `jresid bench` compares jresid against: a
TransformerLens user runs `HookedTransformer.run_with_cache` with a
`names_filter` for `hook_resid_pre`, `hook_resid_post`, `attn.hook_result`
and `hook_mlp_out`, then computes the metrics of docs/metrics.md with
PyTorch, one layer at a time. Only jresid's default options are covered:
the "window" history (`window` earlier valid updates), the "components"
complexity basis and the "effective" rank measure.

The small symmetric eigenproblems run on Gram matrices (`torch.linalg.eigh`,
`eigvalsh`) instead of SVDs of the rows. `torch.linalg.svd` took 7 to 17
times longer on the 0.5B shape's 512 windows of 8 x 896 and 512 component
matrices of 15 x 896 (torch 2.13 CPU, 2 cores). The comparison therefore
runs against the faster of the two plain formulations.

torch is imported inside the functions, so importing this module needs no
PyTorch.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

METRIC_NAMES = ("energy", "innovation", "expansion", "complexity")
CACHE_POINTS = ("hook_resid_pre", "hook_resid_post", "attn.hook_result", "hook_mlp_out")


def cache_names_filter(name: str) -> bool:
    """Select the TransformerLens capture points the metrics need (a `names_filter`)."""
    return name.endswith(CACHE_POINTS)


def metrics_from_cache(cache: Any, num_layers: int, attention_mask=None, *, window: int = 8,
                       rtol: float = 1e-3, eps: float = 1e-6) -> dict[str, Any]:
    """Compute energy, innovation, expansion and complexity from a TransformerLens cache.

    Args:
        cache: a TransformerLens `ActivationCache` (or a dict) holding, for
            every block `l`, `blocks.{l}.hook_resid_pre`, `hook_resid_post`,
            `attn.hook_result` (`[B, T, H, D]`, needs `use_attn_result`) and
            `hook_mlp_out`.
        num_layers: number of blocks.
        attention_mask: `[B, T]` with 1 at real tokens and 0 at padding, or
            `None` when every token is real.
        window: earlier valid updates in the history of innovation and
            expansion.
        rtol: relative singular value cut of expansion and complexity.
        eps: norm at or below which an update has no direction.

    Returns:
        `{metric: [B, L, T] float32 tensor}`, NaN at padding.
    """
    import torch

    per_layer = {name: [] for name in METRIC_NAMES}
    for layer in range(num_layers):
        values = layer_metrics(
            cache[f"blocks.{layer}.hook_resid_pre"],
            cache[f"blocks.{layer}.hook_resid_post"],
            cache[f"blocks.{layer}.attn.hook_result"],
            cache[f"blocks.{layer}.hook_mlp_out"],
            attention_mask,
            window=window,
            rtol=rtol,
            eps=eps,
        )
        for name in METRIC_NAMES:
            per_layer[name].append(values[name])
    return {name: torch.stack(values, dim=1) for name, values in per_layer.items()}


def layer_metrics(resid_pre, resid_post, head_results, mlp_out, attention_mask=None, *, window: int = 8,
                  rtol: float = 1e-3, eps: float = 1e-6) -> dict[str, Any]:
    """Compute the four metrics of one layer for a batch.

    Args:
        resid_pre, resid_post: `[B, T, D]` residual stream entering and
            leaving the block.
        head_results: `[B, T, H, D]` per-head attention outputs.
        mlp_out: `[B, T, D]` MLP output.
        attention_mask: `[B, T]`, 1 at real tokens; `None` for no padding.
        window, rtol, eps: as in `metrics_from_cache`.

    Returns:
        `{metric: [B, T] float32 tensor}`, NaN at padding.
    """
    import torch

    # docs/metrics.md: every reduction runs in float32, or wider when the input is.
    dtype = torch.promote_types(resid_post.dtype, torch.float32)
    update = resid_post.to(dtype) - resid_pre.to(dtype)
    batch, positions, _ = update.shape
    if attention_mask is None:
        valid = torch.ones(batch, positions, dtype=torch.bool, device=update.device)
    else:
        valid = torch.as_tensor(attention_mask, device=update.device).bool()

    nan = torch.full((batch, positions), float("nan"), dtype=dtype, device=update.device)
    energy = torch.where(valid, torch.linalg.vector_norm(update, dim=-1), nan)
    innovation = nan.clone()
    expansion = nan.clone()
    # Histories run over the valid tokens of each row in their order, so each
    # row's valid updates are gathered into one contiguous sequence.
    for row in range(batch):
        positions_valid = torch.nonzero(valid[row]).squeeze(-1)
        updates = update[row, positions_valid]
        innovation[row, positions_valid] = _innovation(updates, window, eps)
        expansion[row, positions_valid] = _expansion(updates, window, rtol, eps)

    components = torch.cat([head_results.to(dtype), mlp_out.to(dtype)[:, :, None, :]], dim=2)
    complexity = torch.where(valid, _effective_rank_of_rows(components, rtol), nan)
    return {"energy": energy, "innovation": innovation, "expansion": expansion, "complexity": complexity}


def _innovation(updates, window: int, eps: float):
    """1 - max cosine with the last `window` nondegenerate updates, for one sequence `[N, D]`."""
    import torch

    norms = torch.linalg.vector_norm(updates, dim=-1)
    degenerate = norms <= eps
    directions = updates / torch.where(degenerate, 1.0, norms)[:, None]
    count = updates.shape[0]
    best = torch.full((count,), -float("inf"), dtype=updates.dtype, device=updates.device)
    for lag in range(1, min(window, count - 1) + 1):
        cosine = (directions[lag:] * directions[:-lag]).sum(dim=-1)
        cosine = torch.where(degenerate[:-lag], -float("inf"), cosine)
        best[lag:] = torch.maximum(best[lag:], cosine)
    # No nondegenerate update in the history, or a degenerate update itself: NaN.
    undefined = degenerate | torch.isinf(best)
    return torch.where(undefined, float("nan"), 1.0 - best)


def _window_history(updates, window: int, eps: float):
    """Stack the `window` updates before each position as rows, `[N, window, D]`.

    Rows before the first update and degenerate updates are zero rows, which
    add nothing to the span.
    """
    import torch

    norms = torch.linalg.vector_norm(updates, dim=-1, keepdim=True)
    rows = torch.where(norms > eps, updates, 0.0)
    padded = torch.cat([rows.new_zeros(window, rows.shape[1]), rows])
    count = updates.shape[0]
    return torch.stack([padded[offset: offset + count] for offset in range(window)], dim=1)


def _expansion(updates, window: int, rtol: float, eps: float):
    """1 - ||P u||^2 / ||u||^2 with P onto the kept span of the window history, `[N]`.

    With `H` the history rows, `H = U S V^T` and `G = H H^T = U S^2 U^T`, the
    projection onto the right singular vectors with `sigma > rtol * sigma_max`
    has `||P u||^2 = sum_j (U_j^T H u)^2 / sigma_j^2` over those j, so only
    the small Gram matrix is decomposed.
    """
    import torch

    history = _window_history(updates, window, eps)
    gram = history @ history.transpose(-1, -2)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    largest = eigenvalues[:, -1:]
    # sigma_j > rtol * sigma_max, written on eigenvalues sigma^2.
    kept = (eigenvalues > rtol**2 * largest) & (eigenvalues > 0)
    inner = history @ updates[:, :, None]
    coefficients = (eigenvectors.transpose(-1, -2) @ inner).squeeze(-1)
    safe = torch.where(kept, eigenvalues, 1.0)
    projected = torch.where(kept, coefficients**2 / safe, 0.0).sum(dim=-1)

    squared_norms = (updates * updates).sum(dim=-1)
    norms = squared_norms.sqrt()
    value = 1.0 - projected / torch.where(norms > eps, squared_norms, 1.0)
    return torch.where(norms > eps, value, float("nan"))


def _effective_rank_of_rows(matrices, rtol: float):
    """Effective rank `exp(-sum p log p)`, `p = sigma / sum(sigma)`, of each `[R, D]` matrix.

    Singular values at or below `rtol * sigma_max` count as zero, and a zero
    matrix has rank 0. Takes `[..., R, D]` and returns `[...]`.
    """
    import torch

    gram = matrices @ matrices.transpose(-1, -2)
    eigenvalues = torch.linalg.eigvalsh(gram)
    largest = eigenvalues[..., -1:]
    kept = (eigenvalues > rtol**2 * largest) & (eigenvalues > 0)
    sigma = torch.where(kept, eigenvalues, 1.0).sqrt()
    sigma = torch.where(kept, sigma, 0.0)
    total = sigma.sum(dim=-1, keepdim=True)
    share = sigma / torch.where(total > 0, total, 1.0)
    entropy = -torch.where(kept, share * torch.log(torch.where(kept, share, 1.0)), 0.0).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), 0.0)
