"""Named bundles of settings: ``neurallm train --preset NAME``; flags given explicitly override the bundle.

Each preset is a plain dict of setting names (the fields of :mod:`neurallm.config`) to values, so it is checked
by the same ``__post_init__`` rules as flags. The README's "Presets" table lists them with measured results.
"""

from __future__ import annotations

from dataclasses import dataclass

from neurallm.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A documented bundle of settings.

    Attributes:
        summary: one line for ``--help`` and the README.
        settings: setting name → value.
    """

    summary: str
    settings: dict


# The PyTorch example's three documented configurations (its README: 200/650/1500 units, dropout 0.2/0.5/0.65).
# float32 (amp none) whatever the default: these presets reproduce the example's numbers, which it measured in float32.
_PE = dict(model="LSTM", nlayers=2, lr=20.0, clip=0.25, epochs=40, batch_size=20, bptt=35, optimizer="sgd", amp="none")
# AWD-LSTM's published settings (Merity et al. 2018, the salesforce/awd-lstm-lm README): 3 layers 1150 wide,
# a 400-wide tied embedding, NT-ASGD at lr 30, every regulariser on.
_AWD = dict(model="AWD_LSTM", emsize=400, nhid=1150, nlayers=3, tied=True, dropout=0.4, dropoute=0.1, wdrop=0.5,
            alpha=2.0, beta=1.0, lr=30.0, clip=0.25, bptt=70, variable_bptt=True, weight_decay=1.2e-6, optimizer="ntasgd", nonmono=5)

PRESETS: dict[str, Preset] = {
    "pe-small": Preset("PyTorch example, small: 2x200 LSTM, dropout 0.2, SGD lr 20",
                       {**_PE, "emsize": 200, "nhid": 200, "dropout": 0.2}),
    "pe-medium": Preset("PyTorch example, medium: 2x650 LSTM, dropout 0.5, SGD lr 20",
                        {**_PE, "emsize": 650, "nhid": 650, "dropout": 0.5}),
    "pe-large": Preset("PyTorch example, large: 2x1500 LSTM, dropout 0.65, SGD lr 20",
                       {**_PE, "emsize": 1500, "nhid": 1500, "dropout": 0.65}),
    "awd-wt2": Preset("AWD-LSTM paper, WikiText-2: 3-layer AWD_LSTM 1150/400 tied, NT-ASGD lr 30, batch 80, 750 epochs",
                      {**_AWD, "dropouti": 0.65, "dropouth": 0.2, "batch_size": 80, "epochs": 750, "seed": 1882}),
    "awd-ptb": Preset("AWD-LSTM paper, Penn Treebank: as awd-wt2 with dropouti 0.4, dropouth 0.25, batch 20, 500 epochs",
                      {**_AWD, "dropouti": 0.4, "dropouth": 0.25, "batch_size": 20, "epochs": 500, "seed": 141}),
    # retuned 2026-12-03 (docs/guides/speed.md, "cpu-fast retuned again"): the bfloat16 output layer is cheap per
    # token but still most of a step, so a narrower tied model with AWD-LSTM's regularisers sees more epochs in 110 s
    # and overfits less (169.90 -> 150.31-156.68 test perplexity, wt2-lite, --max-time 110, 11 runs, 10 at most 155).
    # Then ("cpu-fast, fourth round"): without embedding dropout and with the cosine down to 1% instead of 10%, 10
    # fixed epochs gave 2.5-4.9 points less on each of three seeds; --max-time 110: 147.86-151.26 in 7 runs of 7.
    # amp "auto": bfloat16 where the CPU has it
    "cpu-fast": Preset("a few CPU minutes on a word corpus: 1-layer AWD_LSTM 128/128 tied (bfloat16 where the CPU has "
                       "it), dropout 0.3, dropouti 0.3, dropoute 0, wdrop 0.2, alpha 2, beta 1, AdamW "
                       "2e-2 (weight decay 0.1), its cosine down to 0.01x by --max-time",
                       dict(model="AWD_LSTM", emsize=128, nhid=128, nlayers=1, tied=True, dropout=0.3, dropouti=0.3,
                            dropoute=0.0, wdrop=0.2, alpha=2.0, beta=1.0, adaptive_softmax=False, amp="auto",
                            optimizer="adamw", lr=2e-2, weight_decay=0.1, min_lr_ratio=0.01, epochs=50)),
    # lr retuned 2026-12-03 (docs/guides/speed.md, "char-small retuned"): tinyshakespeare, --max-time 110, test bpc
    # 2.393 at 2e-3, 2.285 at 5e-3, 2.286 at 1e-2, 2.366 at 2e-2; a 2x512 model at 5e-3 gave 2.241 but a worse valid
    "char-small": Preset("characters (tinyshakespeare): 2x256 LSTM, dropout 0.2, AdamW 5e-3, bptt 100",
                         dict(model="LSTM", emsize=128, nhid=256, nlayers=2, dropout=0.2, optimizer="adamw", lr=5e-3,
                              batch_size=32, bptt=100, epochs=10, level="char")),
}


def with_preset(name: str | None, given: dict) -> dict:
    """The settings of preset ``name`` overridden by the ``given`` ones (``name`` None: ``given`` alone)."""
    if name is None:
        return dict(given)
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name].settings, **given}


def presets_help() -> str:
    """The ``--preset`` help text: every preset and what it sets."""
    return "a bundle of settings that explicit flags override: " + "; ".join(
        f"{name}: {preset.summary}" for name, preset in PRESETS.items())
