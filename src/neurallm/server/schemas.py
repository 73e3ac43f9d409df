"""Request and response bodies of the HTTP API, validated by pydantic.

Requests are strict: a field of the wrong JSON type (``"tokens": "5"``, ``true`` for a number), an unknown
field (a typo such as ``max_tokens``), NaN or infinity, or a value out of range is refused with a 4xx and a
JSON error naming the field. The caps depend on the server's settings (``--max-tokens``,
``--max-prompt-chars``), so the request classes are built for those settings and the OpenAPI schema shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from neurallm.config import ServeConfig

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_TEMPERATURE = 100.0
DEFAULT_TOKENS = 100


class GenerateResponse(BaseModel):
    text: str = Field(description="the prompt followed by the generated text")
    tokens: int = Field(description="tokens generated")
    seconds: float = Field(description="time the model took, queue wait excluded")
    prompt_unknown: list[str] = Field(description="prompt tokens not in the vocabulary (read as <unk>)")


class TokenLogprob(BaseModel):
    token: str
    logprob: float = Field(description="natural log of the token's probability given everything before it")
    unknown: bool = Field(description="not in the vocabulary: scored as <unk>")


class ScoreResponse(BaseModel):
    tokens: list[TokenLogprob]
    token_count: int
    total_loss: float = Field(description="negative log-probability of the whole text, nats")
    loss: float = Field(description="mean negative log-probability per token, nats")
    ppl: float = Field(description="perplexity: exp(loss)")
    unknown: int = Field(description="tokens not in the vocabulary")
    seconds: float


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")
    detail: list[dict] | None = Field(default=None, description="pydantic's list of field errors, when there are any")


@dataclass(frozen=True)
class RequestModels:
    generate: type[BaseModel]
    score: type[BaseModel]


def request_models(settings: ServeConfig) -> RequestModels:
    """The request bodies, with the caps of ``settings``."""

    class GenerateRequest(BaseModel):
        model_config = STRICT
        prompt: str = Field("", max_length=settings.max_prompt_chars, description="text to continue")
        tokens: int = Field(min(DEFAULT_TOKENS, settings.max_tokens), ge=1, le=settings.max_tokens,
                            description="tokens to generate")
        temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, description="0 = greedy")
        top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens")
        top_p: float | None = Field(None, gt=0.0, le=1.0, description="sample among the most likely tokens summing to p")
        seed: int = Field(1111, ge=0, le=MAX_SEED, description="the same seed gives the same text")

    class ScoreRequest(BaseModel):
        model_config = STRICT
        text: str = Field(min_length=1, max_length=settings.max_prompt_chars,
                          description="text to score; its lines are read in order, context carried across them")

    return RequestModels(GenerateRequest, ScoreRequest)
