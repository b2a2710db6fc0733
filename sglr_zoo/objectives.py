"""Training objectives (plain torch): SGLR's refined soft labels, and the PGD-AT and TRADES baselines.

Each objective is an `nn.Module` whose forward returns a dict of named tensors: `loss`, `logits` (on the
adversarial batch) and its components, so the training loop stays generic and every term is logged.
SGLR follows shared/SGLR.md (the authors' code by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from sglr_zoo.recipe import MethodConfig


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets[k] * log_softmax(logits)[k], in fp32."""
    return -(targets * logits.float().log_softmax(1)).sum(1).mean()


def trades_kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term: KL(softmax(clean) || softmax(adv)), summed over classes, averaged over the batch."""
    return F.kl_div(adv_logits.float().log_softmax(1), clean_logits.float().softmax(1), reduction="batchmean")


class PGDAT(nn.Module):
    """Madry et al.'s PGD adversarial training: cross-entropy on the adversarial batch with hard labels."""

    attack_loss = "ce"

    def forward(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        logits = model(x_adv)
        return {"loss": F.cross_entropy(logits.float(), y), "logits": logits}


class TRADES(nn.Module):
    """Zhang et al.'s TRADES: CE on the clean logits + beta * KL(clean || adv); the attack maximises the KL."""

    attack_loss = "kl"

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        clean_logits, logits = model(x), model(x_adv)
        ce, kl = F.cross_entropy(clean_logits.float(), y), trades_kl(logits, clean_logits)
        return {"loss": ce + self.beta * kl, "logits": logits, "ce": ce, "kl": kl}


class SGLR(nn.Module):
    """Self-Guided Label Refinement: cross-entropy against a per-example EMA of the model's own predictions.

    Before `start_epoch` it is PGD-AT (TRADES with `trades=True`). From `start_epoch` on, without gradient,
    each example's soft label is updated before the loss,
        t_i = alpha * t_i + (1 - alpha) * (w * softmax(adv / T) + (1 - w) * softmax(clean / T)),
    where the clean logits come from an extra train-mode forward (as in the authors' code), and the target is
    r_hard * onehot + (1 - r_hard) * t_i. With TRADES the target replaces y in the clean CE term. With
    `teacher="weights"` the predictions come from an EMA copy of the weights instead, and no bank is kept.

    The bank is training state, saved in checkpoints. Its updates are returned as `bank_index` and
    `bank_targets` and written with `write_bank` by the loop after gathering them from every process.
    """

    def __init__(self, cfg: MethodConfig, labels: torch.Tensor, num_classes: int, start_epoch: int,
                 model: nn.Module | None = None, trades: bool = False):
        super().__init__()
        self.cfg, self.start_epoch, self.trades = cfg, start_epoch, trades
        self.attack_loss = "kl" if trades else "ce"
        self.register_buffer("bank", F.one_hot(labels, num_classes).float())
        self.teacher = ModelEmaV3(model, decay=cfg.teacher_decay) if cfg.teacher == "weights" else None

    @torch.no_grad()
    def write_bank(self, index: torch.Tensor, targets: torch.Tensor) -> None:
        self.bank[index] = targets.to(self.bank)

    @torch.no_grad()
    def update_teacher(self, model: nn.Module) -> None:
        if self.teacher is not None:
            self.teacher.update(model)

    def _mix(self, adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
        temperature, w = self.cfg.temperature, self.cfg.adv_weight
        p_adv = (adv_logits.detach().float() / temperature).softmax(1)
        p_clean = (clean_logits.detach().float() / temperature).softmax(1)
        return w * p_adv + (1 - w) * p_clean

    def forward(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        clean_logits = model(x) if self.trades else None
        logits = model(x_adv)
        out = {"logits": logits}
        if self.trades:
            out["kl"] = trades_kl(logits, clean_logits)
        ce_logits = clean_logits if self.trades else logits
        if epoch < self.start_epoch:
            out["ce"] = F.cross_entropy(ce_logits.float(), y)
        else:
            with torch.no_grad():
                if self.teacher is not None:
                    teacher = self.teacher.module.eval()
                    refined = self._mix(teacher(x_adv), teacher(x))
                else:
                    mix = self._mix(logits, clean_logits if self.trades else model(x))
                    refined = self.cfg.alpha * self.bank[index] + (1 - self.cfg.alpha) * mix
                    out["bank_index"], out["bank_targets"] = index, refined
                onehot = F.one_hot(y, logits.shape[1]).float()
                targets = self.cfg.r_hard * onehot + (1 - self.cfg.r_hard) * refined
            out["ce"] = soft_cross_entropy(ce_logits, targets)
            out["target_confidence"] = targets.gather(1, y[:, None]).mean()
        out["loss"] = out["ce"] + self.cfg.beta * out["kl"] if self.trades else out["ce"]
        return out


def build_objective(cfg: MethodConfig, *, labels: torch.Tensor, num_classes: int, start_epoch: int,
                    model: nn.Module) -> nn.Module:
    """The objective named in the recipe's `method.name`; `labels` are the training labels in index order."""
    if cfg.name == "pgd_at":
        return PGDAT()
    if cfg.name == "trades":
        return TRADES(cfg.beta)
    return SGLR(cfg, labels, num_classes, start_epoch, model=model, trades=cfg.name == "sglr_trades")
