"""ONNX export of a trained run (``neurallm export RUN --onnx FILE``) and generation from the exported file.

The exported graph is one step of the model over a window, with the state as explicit inputs and outputs so
that a runtime carries it between calls exactly as neurallm does::

    inputs:  ids (T, B) int64          state_0 … state_{n-1}
    outputs: log_probs (T, B, V) float32   next_state_0 … next_state_{n-1}

``T`` (the sequence length) and ``B`` are dynamic. The state is what :meth:`LanguageModel.init_state` makes:
an LSTM's ``h`` and ``c`` ``(nlayers, B, nhid)``, a GRU's or RNN's ``h``; a Transformer with ``--memory M``
carries one memory ``(B, m, emsize)`` per layer, whose length ``m`` is dynamic too (0 at the start of a text,
then up to M); a Transformer without memory carries nothing and has ``ids`` as its only input. The tensor names
and the cold state's shapes are written into the file (``neurallm.state_shapes``; see :func:`onnx_initial_state`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neurallm.errors import ConfigError
from neurallm.outputs import check_output_path, output_path

logger = logging.getLogger(__name__)
OPSET = 18


class _Step(nn.Module):
    """``(ids, *state) → (log_probs, *next_state)``: the model's features and output layer as one graph."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *state: torch.Tensor):
        features, next_state = self.model.features(ids, tuple(state))
        return (self.model.head.log_probs(features), *next_state)


def _example_state(model, batch_size: int) -> tuple[torch.Tensor, ...]:
    state = model.init_state(batch_size, "cpu")
    if state and state[0].dim() == 3 and state[0].size(1) == 0:
        # a Transformer memory: trace with a non-empty one so the graph takes the memory path (an empty memory
        # through that path gives the same result as the no-memory path, which the tests check)
        state = tuple(torch.randn(batch_size, 2, s.size(2)) for s in state)
    return state


def export_onnx(run_dir: str | Path, out_file: str | Path, *, checkpoint: str = "best", flag: str = "--onnx") -> Path:
    """Export the run's model to ``out_file`` (ONNX; see the module docstring for its inputs and outputs).

    ``out_file`` is checked like every output (:func:`neurallm.outputs.check_output_path`): never a run's own file,
    ``-`` for standard output; ``flag`` names it in errors (``train --onnx-export`` calls this too)."""
    from neurallm.api import load_run

    try:
        import onnx
    except ModuleNotFoundError:
        raise ConfigError("--onnx needs the package onnx: pip install 'neurallm[onnx]'") from None
    target = check_output_path(out_file, flag, stdout=True)  # before the run is loaded: a refusal costs nothing
    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    model = run.model.eval()
    state = _example_state(model, batch_size=2)
    ids = torch.zeros(5, 2, dtype=torch.long)
    state_names = [f"state_{i}" for i in range(len(state))]
    next_names = [f"next_state_{i}" for i in range(len(state))]
    is_transformer = run.config.model.model == "Transformer"
    # an RNN state is (nlayers, B, nhid); a Transformer memory (B, m, emsize) with m from 0 to --memory
    state_axes = {0: "batch", 1: "memory"} if is_transformer else {1: "batch"}
    dynamic_axes = {"ids": {0: "seq", 1: "batch"}, "log_probs": {0: "seq", 1: "batch"},
                    **{name: state_axes for name in state_names + next_names}}
    cold = model.init_state(1, "cpu")
    state_shapes = {name: ["batch" if axis == (0 if is_transformer else 1) else size for axis, size in enumerate(s.shape)]
                    for name, s in zip(state_names, cold)}
    with output_path(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter: it keeps nn.LSTM/GRU as ONNX LSTM/GRU nodes with a dynamic sequence length
        torch.onnx.export(_Step(model), (ids, *state), str(tmp), dynamo=False, input_names=["ids", *state_names],
                          output_names=["log_probs", *next_names], dynamic_axes=dynamic_axes, opset_version=OPSET)
        graph = onnx.load(str(tmp))
        for key, value in (("neurallm.state_shapes", json.dumps(state_shapes)),
                           ("neurallm.config", json.dumps(run.config.model.to_dict()))):
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(tmp))
    if not target.is_stdout:  # the model itself is on standard output
        logger.info(f"exported {run_dir} to {out_file}")
    return Path(out_file)


def onnx_initial_state(session, batch_size: int = 1) -> dict[str, np.ndarray]:
    """The cold state inputs of an exported model for ``batch_size`` sequences (zeros; empty memories)."""
    meta = session.get_modelmeta().custom_metadata_map
    shapes = json.loads(meta["neurallm.state_shapes"])
    return {name: np.zeros([batch_size if d == "batch" else d for d in shape], dtype=np.float32)
            for name, shape in shapes.items()}


def generate_onnx(onnx_file: str | Path, run_dir: str | Path, prompt: str = "", **sampling) -> str:
    """Sample after ``prompt`` with onnxruntime running the model (the run folder supplies the vocabulary and
    tokenizer); returns the prompt and its continuation as text.

    ``sampling`` are the fields of :class:`~neurallm.sampling.SamplingSettings`, with ``neurallm generate``'s
    defaults, and tokens are drawn as :func:`neurallm.generation.sample_next` draws them: the same seed gives the
    text ``neurallm generate`` writes, up to the runtimes' rounding. The state outputs of one call are the state
    inputs of the next, so each new token costs one step; a Transformer without memory carries nothing, so it is
    fed its last ``context`` tokens every step instead.
    """
    import onnxruntime

    from neurallm.data.tokenizers import line_break_token
    from neurallm.generation import continue_text, prompt_to_tokens, sample_next, sampling_settings
    from neurallm.runfolder import read_run_config, read_vocab
    from neurallm.sampling import generation_context

    settings = sampling_settings(sampling)
    config = read_run_config(Path(run_dir))
    vocab = read_vocab(Path(run_dir), config.tokenizer)
    context = generation_context(settings, config.train.bptt, config.model.memory)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    stateless = config.model.model == "Transformer" and config.model.memory == 0
    generator = torch.Generator().manual_seed(settings.seed)
    history = vocab.encode(prompt_to_tokens(prompt, config.tokenizer, vocab.bpe)
                           or [line_break_token(config.tokenizer, vocab.bpe)])[0]
    state, feed = onnx_initial_state(session), history[-context:] if stateless else history
    generated: list[str] = []
    for _ in range(settings.tokens):
        outputs = session.run(None, {"ids": np.asarray(feed, dtype=np.int64).reshape(-1, 1), **state})
        if not stateless:
            state = dict(zip(state, outputs[1:]))
        log_probs = torch.from_numpy(outputs[0][-1, 0])  # (V,)
        next_id = sample_next(log_probs, settings.temperature, settings.top_k, settings.top_p, generator)
        generated.append(vocab.tokens[next_id])
        history.append(next_id)
        feed = history[-context:] if stateless else [next_id]
    return continue_text(prompt, generated, config.tokenizer, vocab.bpe)
