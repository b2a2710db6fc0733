"""Training objectives (plain torch): SGLR's refined soft labels, and the PGD-AT and TRADES baselines.

Each objective is an `Objective` (an `nn.Module`) whose forward returns a dict of named tensors: `loss`,
`logits` (on the adversarial batch) and its components, so the training loop stays generic and every term is
logged. After the optimizer step the loop calls `after_step`, where an objective updates its own state (SGLR's
soft-label bank, a weight teacher). SGLR follows shared/SGLR.md (the authors' code by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sglr_zoo.averaging import WeightAverage
from sglr_zoo.recipe import MethodConfig

if TYPE_CHECKING:
    from sglr_zoo.schedule import Plan


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets[k] * log_softmax(logits)[k], in fp32."""
    return -(targets * logits.float().log_softmax(1)).sum(1).mean()


def trades_kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term: KL(softmax(clean) || softmax(adv)), summed over classes, averaged over the batch."""
    return F.kl_div(adv_logits.float().log_softmax(1), clean_logits.float().softmax(1), reduction="batchmean")


# A gather of a tensor from every process, in process order: the loop passes accelerate's `gather_for_metrics`.
Gather = Callable[[torch.Tensor], torch.Tensor]

BANK_FP32_LIMIT = 256 * 2**20  # bytes: a larger soft-label bank is kept in float16 when method.bank_dtype is auto


class Objective(nn.Module):
    """The interface the training loop sees; the baselines keep no state, so their hooks do nothing."""

    attack_loss = "ce"  # the loss the training attack maximises: "ce" or "kl" (TRADES)
    start_epoch: int | None = None  # the epoch from which the objective changes (SGLR's refined labels); None: never

    def after_step(self, out: dict[str, torch.Tensor], model: nn.Module, gather: Gather) -> None:
        """Updates the objective's own state after the optimizer step.

        Args:
            out: what forward returned for this step.
            model: the model after the step (unwrapped: no data-parallel wrapper).
            gather: collects a tensor from every process, so that every process writes the same state.
        """

    def follow(self, plan: Plan) -> None:
        """Takes the run's plan in force before a step (a budgeted run plans again while it trains): an objective
        that changes at an epoch (SGLR's refined labels) moves that epoch with it."""

    def local_modules(self) -> list[nn.Module]:
        """Sub-modules whose buffers each process updates on its own (a weight teacher's BatchNorm statistics):
        the loop aligns them across processes together with the model's."""
        return []


class PGDAT(Objective):
    """Madry et al.'s PGD adversarial training: cross-entropy on the adversarial batch with hard labels (smoothed
    by `label_smoothing`)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        logits = model(x_adv)
        return {"loss": F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), "logits": logits}


class TRADES(Objective):
    """Zhang et al.'s TRADES: CE on the clean logits (hard labels smoothed by `label_smoothing`) + beta *
    KL(clean || adv); the attack maximises the KL."""

    attack_loss = "kl"

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        clean_logits, logits = model(x), model(x_adv)
        ce = F.cross_entropy(clean_logits.float(), y, label_smoothing=self.label_smoothing)
        kl = trades_kl(logits, clean_logits)
        return {"loss": ce + self.beta * kl, "logits": logits, "ce": ce, "kl": kl}


class SGLR(Objective):
    """Self-Guided Label Refinement: cross-entropy against a per-example EMA of the model's own predictions.

    Before `start_epoch` it is PGD-AT (TRADES with `trades=True`). From `start_epoch` on, without gradient,
    each example's soft label is updated before the loss,
        t_i = alpha * t_i + (1 - alpha) * (w * softmax(adv / T) + (1 - w) * softmax(clean / T)),
    where the clean logits come from an extra train-mode forward (as in the authors' code), and the target is
    r_hard * onehot + (1 - r_hard) * t_i. `method.label_smoothing` smooths the hard labels only (the CE before
    `start_epoch`, and `onehot` above), never the refined t_i. With TRADES the target replaces y in the clean CE
    term. With `teacher="weights"` the predictions come from an EMA copy of the weights instead, and no bank is
    kept.

    The bank is training state, saved in checkpoints. forward returns its updates as `bank_index` and
    `bank_targets` (fp32); `after_step` gathers them from every process and writes them, so every process holds
    the same bank. The bank is stored in `method.bank_dtype` (float16 halves an ImageNet-size bank); the EMA is
    computed in fp32 either way: read, update, write back.
    """

    def __init__(self, cfg: MethodConfig, labels: torch.Tensor, num_classes: int, start_epoch: int,
                 model: nn.Module | None = None, trades: bool = False):
        super().__init__()
        self.cfg, self.start_epoch, self.trades = cfg, start_epoch, trades
        self.attack_loss = "kl" if trades else "ce"
        # Filled in place: F.one_hot would first build an int64 copy, 4x the float16 bank.
        bank = torch.zeros(len(labels), num_classes, dtype=bank_dtype(cfg.bank_dtype, len(labels), num_classes))
        bank[torch.arange(len(labels)), labels] = 1
        self.register_buffer("bank", bank)
        self.teacher = WeightAverage(model, cfg.teacher_decay) if cfg.teacher == "weights" else None

    @torch.no_grad()
    def write_bank(self, index: torch.Tensor, targets: torch.Tensor) -> None:
        self.bank[index] = targets.to(self.bank)

    @torch.no_grad()
    def update_teacher(self, model: nn.Module) -> None:
        if self.teacher is not None:
            self.teacher.update_to(model)

    def after_step(self, out: dict[str, torch.Tensor], model: nn.Module, gather: Gather) -> None:
        if "bank_index" in out:
            self.write_bank(gather(out["bank_index"]), gather(out["bank_targets"]))
        self.update_teacher(model)

    def follow(self, plan: Plan) -> None:
        self.start_epoch = plan.start_epoch

    def local_modules(self) -> list[nn.Module]:
        return [self.teacher.module] if self.teacher is not None else []

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
            out["ce"] = F.cross_entropy(ce_logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        else:
            with torch.no_grad():
                if self.teacher is not None:
                    teacher = self.teacher.module.eval()
                    refined = self._mix(teacher(x_adv), teacher(x))
                else:
                    mix = self._mix(logits, clean_logits if self.trades else model(x))
                    refined = self.cfg.alpha * self.bank[index].float() + (1 - self.cfg.alpha) * mix
                    out["bank_index"], out["bank_targets"] = index, refined
                classes, smoothing = logits.shape[1], self.cfg.label_smoothing
                onehot = F.one_hot(y, classes).float() * (1 - smoothing) + smoothing / classes
                targets = self.cfg.r_hard * onehot + (1 - self.cfg.r_hard) * refined
            out["ce"] = soft_cross_entropy(ce_logits, targets)
            out["target_confidence"] = targets.gather(1, y[:, None]).mean()
        out["loss"] = out["ce"] + self.cfg.beta * out["kl"] if self.trades else out["ce"]
        return out


def bank_dtype(name: str, num_examples: int, num_classes: int) -> torch.dtype:
    """The soft-label bank's storage type: `auto` is float32 while the bank stays under 256 MiB, else float16."""
    if name == "auto":
        return torch.float32 if num_examples * num_classes * 4 < BANK_FP32_LIMIT else torch.float16
    return {"float32": torch.float32, "float16": torch.float16}[name]


def build_objective(cfg: MethodConfig, *, labels: torch.Tensor, num_classes: int, start_epoch: int,
                    model: nn.Module) -> Objective:
    """The objective named in the recipe's `method.name`; `labels` are the training labels in index order."""
    if cfg.name == "pgd_at":
        return PGDAT(cfg.label_smoothing)
    if cfg.name == "trades":
        return TRADES(cfg.beta, cfg.label_smoothing)
    return SGLR(cfg, labels, num_classes, start_epoch, model=model, trades=cfg.name == "sglr_trades")
