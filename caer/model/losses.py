"""Losses and class-imbalance remedies (SPEC section 6), and ``CAERLoss``, which puts them together."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..runtime import no_autocast, upcast


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
    """Symmetric InfoNCE between descriptive and learnable prompts; positives are the same class (in float32, as
    ``CAERModel.logits``)."""
    t_desc, t_soft = upcast(t_desc, t_soft)
    with no_autocast(t_desc.device):
        sim = t_desc @ t_soft.t() / temperature
    target = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


def decorrelation_loss(prompts: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity between the classes' prompt embeddings."""
    p = F.normalize(*upcast(prompts), dim=-1)
    with no_autocast(p.device):
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


class LossTerms(NamedTuple):
    total: torch.Tensor
    cls: torch.Tensor
    mi: torch.Tensor
    dc: torch.Tensor


class CAERLoss:
    """``L = L_cls + w_mi(e) * L_mi + w_dc(e) * L_dc``.

    ``L_cls`` is cross-entropy with the configured remedies (class-balanced weights, logit adjustment,
    label smoothing), set from the training split's class counts. The prompt terms apply only in a
    stage whose prompts train (``prompts_train``), with their warm-up and ramp.
    """

    def __init__(self, cfg: LossConfig, class_counts: np.ndarray, prompts_train: bool, device: torch.device):
        self.cfg, self.prompts_train = cfg, prompts_train
        self.ce_weight = class_balanced_weights(class_counts, cfg.cb_beta).to(device) if cfg.class_balanced_loss else None
        self.adjust = (cfg.logit_adj_tau * log_prior(class_counts)).to(device) if cfg.logit_adj else None

    def weights(self, epoch: int) -> tuple[float, float]:
        """(w_mi, w_dc) in ``epoch``."""
        if not self.prompts_train:
            return 0.0, 0.0
        c = self.cfg
        return ramp_weight(epoch, c.lambda_mi, c.mi_warmup, c.mi_ramp), ramp_weight(epoch, c.lambda_dc, c.dc_warmup, c.dc_ramp)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, t_desc: torch.Tensor, t_soft: torch.Tensor,
                 epoch: int) -> LossTerms:
        w_mi, w_dc = self.weights(epoch)
        train_logits = logits + self.adjust if self.adjust is not None else logits
        cls = F.cross_entropy(train_logits, labels, weight=self.ce_weight, label_smoothing=self.cfg.label_smoothing)
        mi = mutual_information_loss(t_desc, t_soft) if w_mi > 0 else logits.new_zeros(())
        dc = decorrelation_loss(t_soft) if w_dc > 0 else logits.new_zeros(())
        return LossTerms(cls + w_mi * mi + w_dc * dc, cls, mi, dc)
