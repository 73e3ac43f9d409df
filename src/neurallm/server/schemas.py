"""Request and response bodies of the HTTP API, validated by pydantic.

Requests are strict: a field of the wrong JSON type (``"tokens": "5"``, ``true`` for a number), an unknown
field (a typo such as ``max_tokens``), NaN or infinity, or a value out of range is refused with a 4xx and a
JSON error naming the field. The caps depend on the server's settings (``--max-tokens``,
``--max-prompt-chars``), so the request classes are built for those settings and the OpenAPI schema shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from neurallm.config import ServeConfig
from neurallm.sampling import MAX_CONTEXT, MAX_SEED, SamplingSettings
from neurallm.settings import settings_of

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_TEMPERATURE = 100.0  # a higher temperature is uniform sampling in all but name


def sampling_fields(settings: ServeConfig) -> dict[str, Any]:
    """Pydantic fields for the sampling settings, from :class:`SamplingSettings`' own fields (defaults, help),
    with the server's caps: ``tokens`` at most ``--max-tokens`` (the default too)."""
    bounds = {"tokens": dict(ge=1, le=settings.max_tokens), "temperature": dict(ge=0.0, le=MAX_TEMPERATURE),
              "top_k": dict(ge=1), "top_p": dict(gt=0.0, le=1.0), "seed": dict(ge=0, le=MAX_SEED),
              "context": dict(ge=1, le=MAX_CONTEXT)}
    fields = {}
    for s in settings_of(SamplingSettings):
        default = min(s.default, settings.max_tokens) if s.name == "tokens" else s.default
        kind = s.kind | None if s.optional else s.kind
        fields[s.name] = (kind, Field(default, description=s.help_with_default(), **bounds[s.name]))
    return fields


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

    GenerateRequest = create_model(
        "GenerateRequest", __config__=STRICT,
        prompt=(str, Field("", max_length=settings.max_prompt_chars, description="text to continue")),
        **sampling_fields(settings),
    )

    class ScoreRequest(BaseModel):
        model_config = STRICT
        text: str = Field(min_length=1, max_length=settings.max_prompt_chars,
                          description="text to score; its lines are read in order, context carried across them")

    return RequestModels(GenerateRequest, ScoreRequest)


def sampling_of(body: BaseModel) -> SamplingSettings:
    """The :class:`SamplingSettings` a request body gives."""
    return SamplingSettings(**{s.name: getattr(body, s.name) for s in settings_of(SamplingSettings)})
