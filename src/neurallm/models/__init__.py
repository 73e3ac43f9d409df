"""Language models. Every model maps ``(T, B)`` ids and a carried state to ``(T, B, D)`` features and a new
state; its output layer (``model.head``) turns features into log-probabilities or a loss, so the output layer
can be swapped (an adaptive softmax, say) without touching the body or the training loop."""

from neurallm.models.build import build_model
from neurallm.models.head import SoftmaxHead

__all__ = ["build_model", "SoftmaxHead"]
