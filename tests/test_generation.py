"""Generation: seeded sampling, the state carried token to token, greedy limits of top-k/top-p, the KV cache."""

from __future__ import annotations

import pytest
import torch

from neurallm import generation
from neurallm.config import ModelConfig
from neurallm.data.batching import ContiguousBatches, batchify
from neurallm.data.tokenizers import EOS, UNK, TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError
from neurallm.generation import generate, sample_next
from neurallm.models import build_model
from neurallm.training.step import training_step

WORD = TokenizerSettings()
CYCLE = ["one", "two", "three", "four", "five", EOS]
VOCAB = Vocab([UNK, EOS, "one", "two", "three", "four", "five", "six", "seven"])


def _model(model: str = "LSTM", seed: int = 0, **settings) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = dict(model=model, vocab_size=len(VOCAB), emsize=16, nhid=16, nlayers=1, dropout=0.0)
    return build_model(ModelConfig(**{**base, **settings})).eval()


def _train_on_the_cycle(model: torch.nn.Module, steps: int = 80) -> torch.nn.Module:
    """Teach ``model`` the line "one two three four five" repeated forever."""
    ids, _ = VOCAB.encode(CYCLE * 100)
    batches = ContiguousBatches(batchify(torch.tensor(ids), 4), bptt=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    model.train()
    state = model.init_state(4)
    for step in range(steps):
        for inputs, targets in batches.epoch(step):
            state = state if model.carries_state else model.init_state(4)
            outcome = training_step(model, optimizer, inputs, targets, state, clip=0)
            state = outcome.state
        if outcome.nll.item() < 0.02:
            break
    return model.eval()


@pytest.fixture(scope="module")
def cycle_lstm() -> torch.nn.Module:
    return _train_on_the_cycle(_model("LSTM"))


# --- seeds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["LSTM", "Transformer"])
def test_the_same_seed_gives_the_same_text_and_another_seed_another_text(model):
    net = _model(model)
    first = generate(net, VOCAB, WORD, tokens=40, seed=3)
    again = generate(net, VOCAB, WORD, tokens=40, seed=3)
    other = generate(net, VOCAB, WORD, tokens=40, seed=4)
    assert first.text == again.text
    assert first.generated_tokens != other.generated_tokens
    assert len(first.generated_tokens) == 40


def test_generation_does_not_touch_the_global_random_state():
    net = _model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(net, VOCAB, WORD, tokens=10, seed=1)
    assert torch.equal(torch.rand(3), expected)


# --- the state is carried token to token ------------------------------------------------------------------


def test_an_rnn_samples_exactly_as_a_loop_that_carries_its_state():
    net = _model("GRU", seed=5)
    result = generate(net, VOCAB, WORD, prompt="one two three", tokens=25, seed=9)

    generator = torch.Generator().manual_seed(9)
    state = net.init_state(1)
    expected = []
    with torch.no_grad():
        features, state = net.features(torch.tensor([[2], [3], [4]]), state)  # one two three
        for _ in range(25):
            probs = torch.softmax(net.head.log_probs(features[-1, 0]), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
            expected.append(token)
            features, state = net.features(torch.tensor([[token]]), state)
    assert result.generated_tokens == VOCAB.decode(expected)


def test_a_model_trained_on_a_pattern_continues_it_greedily_across_lines(cycle_lstm):
    result = generate(cycle_lstm, VOCAB, WORD, prompt="one two", tokens=16, temperature=0)
    assert result.generated_tokens == (CYCLE * 3)[2:18]
    assert result.text == "one two three four five\n" * 3


def test_eos_is_written_as_a_line_break(cycle_lstm):
    result = generate(cycle_lstm, VOCAB, WORD, prompt="four", tokens=7, temperature=0)
    assert EOS in result.generated_tokens
    assert EOS not in result.text
    assert result.text == "four five\none two three four five"


def test_an_empty_prompt_starts_at_the_beginning_of_a_line(cycle_lstm):
    result = generate(cycle_lstm, VOCAB, WORD, tokens=5, temperature=0)
    assert result.prompt_tokens == []
    assert result.text == "one two three four five"


def test_a_prompt_ending_with_a_line_break_is_a_finished_line(cycle_lstm):
    result = generate(cycle_lstm, VOCAB, WORD, prompt="one two three four five\n", tokens=2, temperature=0)
    assert result.prompt_tokens == CYCLE
    assert result.text == "one two three four five\none two"


def test_unknown_prompt_words_are_reported_and_read_as_unk(cycle_lstm):
    result = generate(cycle_lstm, VOCAB, WORD, prompt="one zebra two okapi", tokens=3, seed=1)
    assert result.prompt_unknown == ["zebra", "okapi"]
    assert result.prompt_tokens == ["one", "zebra", "two", "okapi"]
    assert result.text.startswith("one zebra two okapi ")


# --- temperature, top-k and top-p -------------------------------------------------------------------------


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    net = _model("LSTM", seed=2)
    greedy = generate(net, VOCAB, WORD, tokens=30, temperature=0).generated_tokens
    assert generate(net, VOCAB, WORD, tokens=30, top_k=1, seed=5).generated_tokens == greedy
    assert generate(net, VOCAB, WORD, tokens=30, top_p=1e-6, seed=6).generated_tokens == greedy
    assert generate(net, VOCAB, WORD, tokens=30, seed=5).generated_tokens != greedy  # plain sampling is not


def test_sample_next_keeps_only_the_top_k_tokens():
    logits = torch.tensor([0.0, 3.0, 2.9, 2.8, -1.0])
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 1.0, 2, None, generator) for _ in range(200)}
    assert drawn == {1, 2}


def test_sample_next_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, None, 0.75, generator) for _ in range(300)} == {0, 1}
    assert {sample_next(logits, 1.0, None, 0.85, generator) for _ in range(300)} == {0, 1, 2}


@pytest.mark.parametrize(
    "settings,flag",
    [(dict(tokens=0), "--tokens"), (dict(temperature=-1.0), "--temperature"), (dict(top_k=0), "--top-k"),
     (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p")],
)
def test_bad_sampling_settings_are_config_errors_naming_the_flag(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        generate(_model(), VOCAB, WORD, **settings)


# --- characters --------------------------------------------------------------------------------------------


def test_char_level_generation_joins_characters():
    vocab = Vocab([UNK, "a", "b", " ", "\n"])
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="GRU", vocab_size=len(vocab), emsize=8, nhid=8, nlayers=1, dropout=0.0)).eval()
    result = generate(net, vocab, TokenizerSettings(level="char"), prompt="ab", tokens=30, seed=2)
    assert result.text == "ab" + "".join(result.generated_tokens)
    assert set(result.generated_tokens) <= set(vocab.tokens)


# --- the Transformer's KV cache ---------------------------------------------------------------------------


def _record_sampled_distributions(monkeypatch) -> list[torch.Tensor]:
    """Log-probabilities handed to the sampler at every generated token."""
    seen = []
    real_sample_next = generation.sample_next

    def recording_sample_next(log_probs, *args):
        seen.append(log_probs.clone())
        return real_sample_next(log_probs, *args)

    monkeypatch.setattr(generation, "sample_next", recording_sample_next)
    return seen


def _cold_log_probs(net, ids: list[int]) -> torch.Tensor:
    """Log-probabilities after each of ``ids``, from one cold window over all of them: no cache involved."""
    with torch.no_grad():
        features, _ = net.features(torch.tensor(ids).view(-1, 1), net.init_state(1))
        return net.head.log_probs(features[:, 0])


@pytest.mark.parametrize("memory", [0, 4])
@pytest.mark.parametrize("prompt", ["one two three four", "one two three four five one two three four five six"])
def test_transformer_generation_with_its_kv_cache_matches_running_the_whole_prefix(memory, prompt, monkeypatch):
    net = _model("Transformer", seed=1, nlayers=2, nhead=2, memory=memory)
    seen = _record_sampled_distributions(monkeypatch)
    # context 8 is shorter than the long prompt (fed in two slices) but, with 12 tokens generated, not than the
    # text; 64 holds the whole text
    result = generate(net, VOCAB, WORD, prompt=prompt, tokens=12, seed=4, context=64)
    ids, _ = VOCAB.encode(prompt.split() + result.generated_tokens)
    reference = _cold_log_probs(net, ids)
    n_prompt = len(prompt.split())
    assert len(seen) == 12
    for step, cached in enumerate(seen):
        assert torch.allclose(cached, reference[n_prompt - 1 + step], atol=1e-5), f"step {step}"


@pytest.mark.parametrize("prompt_words", [3, 9])
def test_a_transformer_token_attends_to_exactly_the_last_context_positions(prompt_words, monkeypatch):
    """With --context 5 a one-layer model's every distribution equals a cold run over the last 5 tokens, the newest
    included. (With more layers the reach compounds: older cached keys carry what their own windows saw.)"""
    net = _model("Transformer", seed=1, nlayers=1, nhead=2)
    seen = _record_sampled_distributions(monkeypatch)
    prompt = " ".join((CYCLE[:-1] * 2)[:prompt_words])
    result = generate(net, VOCAB, WORD, prompt=prompt, tokens=20, seed=0, context=5)
    ids, _ = VOCAB.encode(prompt.split() + result.generated_tokens)
    for step, cached in enumerate(seen):
        last = prompt_words + step  # tokens seen before this draw
        window = ids[max(0, last - 5) : last]
        assert torch.allclose(cached, _cold_log_probs(net, window)[-1], atol=1e-5), f"step {step}"


def test_the_transformer_cache_is_a_fixed_size_buffer():
    net = _model("Transformer", seed=1, nlayers=2, nhead=2)
    cache = net.start_generation(1, context=5)
    shapes = {tuple(t.shape) for t in cache.tensors}
    for token in [2, 3, 4, 5, 6, 2, 3, 4]:
        with torch.no_grad():
            _, cache = net.generation_step(torch.tensor([[token]]), cache)
        assert {tuple(t.shape) for t in cache.tensors} == shapes == {(1, 2, 5, 8)}  # (B, H, context, Dh)
    assert cache.length == 8 and cache.capacity == 5


@pytest.mark.parametrize("model", ["LSTM", "Transformer"])
def test_no_forward_is_run_after_the_last_token(model, monkeypatch):
    net = _model(model, nhead=2)
    calls = []
    real_step = net.generation_step
    monkeypatch.setattr(net, "generation_step", lambda ids, cache: calls.append(ids.size(0)) or real_step(ids, cache))
    generate(net, VOCAB, WORD, prompt="one two three", tokens=10, seed=0, context=16)
    assert calls == [3] + [1] * 9  # the prompt, then every drawn token but the last


def test_a_transformer_trained_on_a_pattern_continues_it_greedily():
    net = _train_on_the_cycle(_model("Transformer", seed=0, nhead=2, memory=6))
    # the prompt gives the model some history: it was trained with memory, never from a cold single token
    result = generate(net, VOCAB, WORD, prompt="one two three", tokens=9, temperature=0, context=18)
    assert result.text == "one two three four five\none two three four five\n"


# --- extreme settings and streamed text ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-30, 1e-45])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    model = _model()
    greedy = generate(model, VOCAB, WORD, prompt="one two", tokens=20, temperature=0)
    assert generate(model, VOCAB, WORD, prompt="one two", tokens=20, temperature=temperature).text == greedy.text


@pytest.mark.parametrize("settings,flag", [(dict(temperature=float("nan")), "--temperature"),
                                           (dict(temperature=float("inf")), "--temperature"),
                                           (dict(seed=2**64), "--seed"), (dict(seed=-1), "--seed"),
                                           (dict(context=-3), "--context"), (dict(tokens=generation.MAX_TOKENS + 1), "--tokens")])
def test_out_of_range_settings_are_refused_before_any_sampling(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        generate(_model(), VOCAB, WORD, **settings)


def test_the_largest_64_bit_seed_samples():
    assert len(generate(_model(), VOCAB, WORD, tokens=5, seed=2**64 - 1).generated_tokens) == 5


@pytest.mark.parametrize("prompt", ["", "one two", "one two ", "one\n"])
@pytest.mark.parametrize("level", ["word", "char"])
def test_the_streamed_pieces_add_up_to_the_text(prompt, level):
    vocab = VOCAB if level == "word" else Vocab([UNK, "o", "n", "e", " ", "\n"])
    torch.manual_seed(0)
    net = build_model(ModelConfig(model="GRU", vocab_size=len(vocab), emsize=8, nhid=8, nlayers=1, dropout=0.0)).eval()
    pieces: list[str] = []
    result = generate(net, vocab, TokenizerSettings(level=level), prompt=prompt, tokens=40, seed=3, on_text=pieces.append)
    assert "".join(pieces) == result.text
    assert len(pieces) == 41  # the prompt, then one piece per token: text appears as it is made


# --- the one streaming route: stop strings and the stop hook ----------------------------------------------------


@pytest.mark.parametrize("stop,continuation", [
    (["four"], " three "),  # inside the first line
    (["e\none"], " three four fiv"),  # across a line break: the stop string spans tokens
    (["zzz", " five"], " three four"),  # the first stop string that appears wins, whichever is listed first
    (["seven"], " three four five\none two three four five\none two"),  # never made: all 12 tokens
])
def test_stop_strings_end_the_text_before_them_and_the_stream_never_shows_them(cycle_lstm, stop, continuation):
    from neurallm.generation import stream_generation
    from neurallm.sampling import SamplingSettings

    stream = stream_generation(cycle_lstm, VOCAB, WORD, "one two", SamplingSettings(tokens=12, temperature=0), stop=stop)
    pieces = [piece.text for piece in stream]
    assert stream.text == continuation and "".join(pieces) == continuation
    assert stream.finish_reason == ("length" if stop == ["seven"] else "stop")
    assert generate(cycle_lstm, VOCAB, WORD, prompt="one two", tokens=12, temperature=0, stop=stop).text == "one two" + continuation


def test_the_stop_hook_ends_the_generation_after_the_token_it_saw(cycle_lstm):
    from neurallm.generation import stream_generation
    from neurallm.sampling import SamplingSettings

    seen = []
    stream = stream_generation(cycle_lstm, VOCAB, WORD, "one", SamplingSettings(tokens=50, temperature=0),
                               should_stop=lambda: len(seen) == 4)
    for piece in stream:
        seen.append(piece.token.token)
    assert seen == ["two", "three", "four", "five"] and stream.finish_reason == "stopped"


def test_token_choices_carry_the_models_log_probabilities_and_offsets(cycle_lstm):
    from neurallm.generation import stream_generation
    from neurallm.sampling import SamplingSettings

    stream = stream_generation(cycle_lstm, VOCAB, WORD, "one", SamplingSettings(tokens=6, temperature=0), top_logprobs=3)
    list(stream)
    for choice in stream.choices:
        assert choice.top[0][0] == choice.id and choice.top[0][1] == pytest.approx(choice.logprob)  # greedy: the top one
        assert len(choice.top) == 3 and choice.logprob <= 0
        assert stream.text[choice.offset:].lstrip(" ").startswith(choice.token if choice.token != EOS else "\n")


def test_a_token_id_prompt_continues_as_its_text_does(cycle_lstm):
    from neurallm.generation import stream_generation
    from neurallm.sampling import SamplingSettings

    settings = SamplingSettings(tokens=8, seed=3)
    by_text = stream_generation(cycle_lstm, VOCAB, WORD, "one two", settings)
    by_ids = stream_generation(cycle_lstm, VOCAB, WORD, VOCAB.encode(["one", "two"])[0], settings)
    assert [p.text for p in by_ids] == [p.text for p in by_text] and by_ids.prompt_text == "one two"
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        stream_generation(cycle_lstm, VOCAB, WORD, [len(VOCAB)], settings)


def test_sampling_settings_are_declared_once_for_every_route():
    from neurallm.cli import build_parser
    from neurallm.sampling import DEFAULT_TOKENS, SamplingSettings

    generate_parser = build_parser()._subparsers._group_actions[0].choices["generate"]
    defaults = {a.dest: a for a in generate_parser._actions}
    assert {"--tokens", "--words"} <= set(defaults["tokens"].option_strings)
    assert f"(default: {DEFAULT_TOKENS})" in defaults["tokens"].help
    assert SamplingSettings().tokens == DEFAULT_TOKENS and SamplingSettings(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(ConfigError, match="--seed"):
        SamplingSettings(seed=2**64)
