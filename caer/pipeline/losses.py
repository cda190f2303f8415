"""Losses and class-imbalance remedies (SPEC section 6)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_balanced_weights(counts: np.ndarray, beta: float = 0.9999) -> torch.Tensor:
    """Effective-number weights (Cui et al. 2019): (1 - beta) / (1 - beta^n_c), scaled to sum to C."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    w = (1 - beta) / (1 - np.power(beta, counts))
    return torch.tensor(w / w.sum() * len(counts), dtype=torch.float32)


def log_prior(counts: np.ndarray) -> torch.Tensor:
    """log of the training label distribution, for logit adjustment (Menon et al. 2021)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    return torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)


def mutual_information_loss(t_desc: torch.Tensor, t_soft: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE between descriptive and learnable prompts; positives are the same class."""
    sim = t_desc @ t_soft.t() / temperature
    target = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


def decorrelation_loss(prompts: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity between the classes' prompt embeddings."""
    p = F.normalize(prompts, dim=-1)
    sim = p @ p.t()
    off = ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    return sim[off].pow(2).mean()


def ramp_weight(epoch: int, target: float, warmup: int, ramp: int) -> float:
    """0 before ``warmup``; then linear up to ``target`` over ``ramp`` epochs (reached at once when ramp = 0)."""
    if epoch < warmup:
        return 0.0
    if ramp <= 0:
        return target
    return target * min(1.0, (epoch - warmup + 1) / ramp)
