"""``neurallm export RUN --hf DIR``: a Transformer run as a GPT-NeoX model that ``transformers`` loads without
custom code (``AutoModelForCausalLM.from_pretrained(DIR)``, ``AutoTokenizer.from_pretrained(DIR)``).

Why GPT-NeoX: it is the standard architecture built from exactly neurallm's pieces, checked one by one against
``transformers``' ``modeling_gpt_neox.py``:

========================  ====================================  ==========================================
piece                     neurallm (models/transformer.py)      GPT-NeoX setting
========================  ====================================  ==========================================
residuals                 pre-LN, attention then feed-forward   ``use_parallel_residual=False``
rotary positions          rotate-half, whole head, base 10000   ``rope_theta=10000``, ``partial_rotary_factor=1``
attention                 scaled by 1/sqrt(head size), biases  ``head_size**-0.5``, ``attention_bias=True``
feed-forward              Linear, exact GELU, Linear            ``hidden_act="gelu"`` (exact, not tanh)
layer norms               eps 1e-5, with biases; a final one    ``layer_norm_eps=1e-5``, ``final_layer_norm``
output layer              no bias (the Transformer's default)  ``lm_head`` has none
tied embeddings           ``--tied``                            ``tie_word_embeddings``
========================  ====================================  ==========================================

One layout differs: neurallm's fused query/key/value weight is ``[3, heads, head size]`` (all queries, then all
keys, then all values); GPT-NeoX's is ``[heads, 3, head size]`` (per head its query, key and value). The rows
are permuted on export.

What has no counterpart is refused with one line naming ``--onnx``, which keeps everything: an RNN (its state),
a Transformer with ``--memory`` (attention to the previous window), an adaptive softmax, and an output bias
(``--output-bias``, or a Transformer trained before it was off by default).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from neurallm.errors import ConfigError
from neurallm.integrations.hf_tokenizer import build_tokenizer, line_break_text
from neurallm.models.head import SoftmaxHead


ROPE_THETA = 10000.0  # neurallm.models.transformer.rotary's base
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the Transformer uses


def check_exportable(config, model) -> None:
    """Raise a one-line :class:`ConfigError` if the model has no exact GPT-NeoX counterpart."""
    model_config = config.model
    if model_config.model != "Transformer":
        raise ConfigError(f"--hf: --model {model_config.model} has no counterpart in Hugging Face transformers (its "
                          "state is carried from token to token); export it with --onnx FILE instead")
    if model_config.memory > 0:
        raise ConfigError(f"--hf: this Transformer attends to a memory of the previous window (--memory "
                          f"{model_config.memory}), which no standard architecture does; export it with --onnx FILE instead")
    if not isinstance(model.head, SoftmaxHead):
        raise ConfigError("--hf: an adaptive softmax has no counterpart in Hugging Face transformers; "
                          "export it with --onnx FILE instead")
    if model.head.bias is not None:
        raise ConfigError("--hf: this Transformer has an output bias, which GPT-NeoX has not; train it with "
                          "--no-output-bias (the default since export --hf exists), or export it with --onnx FILE instead")


def gpt_neox_config(config, context: int, line_break: int):
    """The ``GPTNeoXConfig`` of a run's Transformer; ``context`` becomes ``max_position_embeddings``.

    ``line_break`` (the id of the end-of-line token) is the BOS token: neurallm starts every document after a line
    break, and ``generate()`` without a prompt starts from it, as ``neurallm generate`` does. There is no EOS token:
    a line break ends a line, not the text, so generation runs to its length as neurallm's does."""
    from transformers import GPTNeoXConfig

    m = config.model
    return GPTNeoXConfig(
        vocab_size=m.vocab_size, hidden_size=m.emsize, num_hidden_layers=m.nlayers, num_attention_heads=m.nhead,
        intermediate_size=m.nhid, hidden_act="gelu", max_position_embeddings=context, layer_norm_eps=LAYER_NORM_EPS,
        use_parallel_residual=False, attention_bias=True, tie_word_embeddings=m.tied,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 1.0},
        attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=line_break, eos_token_id=None, pad_token_id=None,
        architectures=["GPTNeoXForCausalLM"],
    )


def gpt_neox_state_dict(model) -> dict[str, torch.Tensor]:
    """The Transformer's weights under GPT-NeoX's names (query/key/value rows permuted; see the module docstring)."""
    C, H = model.config.emsize, model.config.nhead
    out = {"gpt_neox.embed_in.weight": model.encoder.weight,
           "gpt_neox.final_layer_norm.weight": model.ln_final.weight,
           "gpt_neox.final_layer_norm.bias": model.ln_final.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"gpt_neox.layers.{i}."
        qkv_weight = block.attn.qkv.weight.view(3, H, C // H, C).transpose(0, 1).reshape(3 * C, C)
        qkv_bias = block.attn.qkv.bias.view(3, H, C // H).transpose(0, 1).reshape(3 * C)
        out.update({
            prefix + "input_layernorm.weight": block.ln_attn.weight, prefix + "input_layernorm.bias": block.ln_attn.bias,
            prefix + "attention.query_key_value.weight": qkv_weight, prefix + "attention.query_key_value.bias": qkv_bias,
            prefix + "attention.dense.weight": block.attn.proj.weight, prefix + "attention.dense.bias": block.attn.proj.bias,
            prefix + "post_attention_layernorm.weight": block.ln_ffn.weight,
            prefix + "post_attention_layernorm.bias": block.ln_ffn.bias,
            prefix + "mlp.dense_h_to_4h.weight": block.ffn[0].weight, prefix + "mlp.dense_h_to_4h.bias": block.ffn[0].bias,
            prefix + "mlp.dense_4h_to_h.weight": block.ffn[2].weight, prefix + "mlp.dense_4h_to_h.bias": block.ffn[2].bias,
        })
    if not model.config.tied:
        out["lm_head.weight"] = model.head.weight
    return {name: tensor.detach().float().contiguous() for name, tensor in out.items()}


def check_output_folder(folder: Path) -> None:
    """Refuse an output folder that holds anything but a previous export (a run folder above all); the rules every
    output path follows (:func:`neurallm.outputs.check_output_path`) first."""
    from neurallm.outputs import check_output_path
    from neurallm.runfolder import is_run_dir

    previous_export = folder.is_dir() and any(folder.iterdir()) and all(p.name in EXPORT_FILES for p in folder.iterdir())
    if not previous_export:  # (which has a config.json, like a run, but nothing else of a run's)
        check_output_path(folder, "--hf", folder=True, what="the export")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--hf {folder}: a file of that name exists; name a new or empty folder")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES) if folder.is_dir() else []
    if foreign:
        if is_run_dir(folder):  # (a previous export has a config.json too, but nothing else of a run's)
            raise ConfigError(f"--hf {folder} is a neurallm run folder; name a new or empty folder for the export")
        raise ConfigError(f"--hf {folder} holds files that are not a Hugging Face export ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); name a new or empty folder")


# what save_pretrained writes for a model and a fast tokenizer: a folder holding only these is a previous export
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def export_hf(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best") -> Path:
    """Write the run's Transformer and tokenizer to ``out_dir`` in Hugging Face's layout (module docstring).

    The folder is written beside ``out_dir`` first and moved in file by file at the end, so an export that fails
    leaves nothing half-written. Returns ``out_dir``.
    """
    from neurallm.api import load_run

    try:
        import transformers
    except ModuleNotFoundError:
        raise ConfigError("--hf needs the package transformers: pip install 'neurallm[hf]'") from None
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    check_exportable(run.config, run.model)
    context = run.config.train.bptt  # neurallm's default generation context for a Transformer without memory
    hf_model = transformers.GPTNeoXForCausalLM(gpt_neox_config(run.config, context, line_break_id(run)))
    hf_model.load_state_dict(gpt_neox_state_dict(run.model), strict=not run.config.model.tied)
    if run.config.model.tied:
        hf_model.tie_weights()
    hf_model.eval()
    tokenizer = _fast_tokenizer(run)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-") as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        out_dir.mkdir(exist_ok=True)
        for entry in Path(tmp).iterdir():
            os.replace(entry, out_dir / entry.name)
    return out_dir


def _fast_tokenizer(run):
    """The run's tokenizer wrapped as a ``PreTrainedTokenizerFast`` (what ``AutoTokenizer`` loads back).

    No special tokens are declared at word and character level: ``transformers`` makes each one an "added token",
    cut out of the text before it is split, so ``x<unk>y`` would become three tokens where neurallm reads one
    unknown word, and the characters of ``<unk>`` typed in a text would become one token at character level.
    A BPE run's ``<unk>`` already is an added token of its ``tokenizer.json``, so it is declared there.
    """
    from transformers import PreTrainedTokenizerFast

    settings = run.config.tokenizer
    special = {"unk_token": "<unk>"} if settings.level == "bpe" else {}
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(run.vocab, settings),
                                   model_max_length=run.config.train.bptt, clean_up_tokenization_spaces=False, **special)


def line_break_id(run) -> int:
    """Id of the token a document starts after (``<eos>``, ``"\\n"``, or the BPE's line break)."""
    settings = run.config.tokenizer
    token = run.vocab.bpe.tokens("")[-1] if settings.level == "bpe" else line_break_text(settings.level)
    return run.vocab.index[token]
