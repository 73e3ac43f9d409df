"""Language models, all subclasses of :class:`~neurallm.models.contract.LanguageModel`: ``(T, B)`` ids and a
carried state in, ``(T, B, D)`` features and a new state out; the output layer (``model.head``, an
:class:`~neurallm.models.contract.OutputHead`) turns features into log-probabilities or a loss, so it can be
swapped (an adaptive softmax, say) without touching the body, the trainer, evaluation or generation."""

from neurallm.models.build import build_model, count_parameters
from neurallm.models.contract import EvalLayout, GenerationCache, LanguageModel, OutputHead, State, StepOutput
from neurallm.models.head import SoftmaxHead

__all__ = ["build_model", "count_parameters", "EvalLayout", "GenerationCache", "LanguageModel", "OutputHead", "SoftmaxHead", "State", "StepOutput"]
