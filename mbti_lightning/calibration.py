"""Temperature scaling: probabilities that mean what they say, folded into the exported weights.

A fine-tuned classifier is often over- or under-confident. One temperature T per head, fitted on
the validation split by minimising the negative log-likelihood, turns logits z into z / T; the
predicted class never changes (T > 0), only how sure the model says it is. Dividing the
classification head's weights and bias by T makes plain ``pipeline`` return the calibrated scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mbti_lightning.metrics import calibration_error


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of (rows, classes) `logits` divided by `temperature`."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of ``logits / T``; 1.0 unless it lowers the NLL."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if nll(logits, labels, temperature) < nll(logits, labels) else 1.0


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Expected calibration error of ``softmax(logits / temperature)``, as logged in ``val/ece``."""
    metric = calibration_error(logits.shape[-1])
    metric.update((logits.float() / temperature).softmax(-1), labels)
    return float(metric.compute())


def classification_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that outputs a Hugging Face sequence classifier's logits (``score``, ``classifier``,
    ``out_proj``...): the last one with ``num_labels`` outputs, the trained copy under peft."""
    num_labels = model.config.num_labels
    heads = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features == num_labels and "original_module" not in name
    ]
    if not heads:
        raise ValueError(f"found no linear layer with {num_labels} outputs in {type(model).__name__}")
    return heads[-1]


@torch.no_grad()
def fold_temperatures(model: torch.nn.Module, per_output: list[float]) -> None:
    """Divide output i of `model`'s classification head by ``per_output[i]``."""
    head = classification_head(model)
    scale = torch.tensor(per_output, dtype=torch.float64)
    head.weight.copy_((head.weight.double() / scale[:, None]).to(head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_((head.bias.double() / scale).to(head.bias.dtype))


def reliability_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor, float]], out: Path, bins: int = 10) -> None:
    """Accuracy against confidence per head, before and after temperature scaling.

    `curves` maps a head to its validation (logits, labels, temperature).
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    edges = torch.linspace(0, 1, bins + 1)
    for ax, (head, (logits, labels, temperature)) in zip(axes[0], curves.items()):
        for t, name in ((1.0, "before"), (temperature, f"after (T = {temperature:.2f})")):
            confidence, predicted = (logits.float() / t).softmax(-1).max(-1)
            which = torch.bucketize(confidence, edges[1:-1])
            shown = [b for b in range(bins) if (which == b).any()]
            ax.plot(
                [float(confidence[which == b].mean()) for b in shown],
                [float((predicted == labels)[which == b].float().mean()) for b in shown],
                marker="o",
                label=name,
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
        ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability, {head}", xlim=(0, 1), ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
