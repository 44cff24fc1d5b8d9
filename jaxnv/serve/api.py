"""The OpenAI completions protocol: the request schema and the response bodies (no I/O).

Accepted on top of OpenAI's fields (as vLLM spells them): `top_k`, `stop_token_ids`, and
`return_token_ids` (each choice, and each streamed chunk, then carries its `token_ids`).
"""

from __future__ import annotations

import secrets

from pydantic import BaseModel, ConfigDict, ValidationError

from jaxnv.serve.engine import MAX_SEED, RequestError, SamplingParams

MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_PROMPTS = 32  # prompts per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """A `POST /v1/completions` body; unknown fields are ignored, unsupported ones refused."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None

    def prompts(self) -> list:
        """The prompts: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = secrets.randbelow(MAX_SEED) if self.seed is None else self.seed
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
            stop_ids=tuple(self.stop_token_ids or ()),
            stop=tuple(stop),
        )

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def parse_request(body: bytes) -> CompletionRequest:
    """The request in `body`, or a RequestError naming the field to fix."""
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"][:1])
        if err["type"] == "json_invalid":
            raise RequestError(f"the body is not valid JSON ({err['msg']})") from None
        if err["type"] == "model_type":
            raise RequestError("the body must be a JSON object") from None
        if err["type"] == "missing":
            raise RequestError(f"'{loc}' is required", loc) from None
        raise RequestError(f"'{loc}': {err['msg']}", loc or None) from None
    if not req.prompts() or any(len(p) == 0 for p in req.prompts()):
        raise RequestError("'prompt' must be a non-empty text or list of token ids", "prompt")
    if len(req.prompts()) > MAX_PROMPTS:
        raise RequestError(f"'prompt' holds {len(req.prompts())} prompts, over the limit of "
                           f"{MAX_PROMPTS} per request: split it", "prompt")  # fmt: skip
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' holds {len(stops)} strings, over the limit of {MAX_STOPS}",
                           "stop")  # fmt: skip
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise RequestError(f"'stop' strings must be at most {MAX_STOP_CHARS} characters long",
                           "stop")  # fmt: skip
    unsupported = {"n": req.n != 1, "best_of": req.best_of not in (None, 1), "echo": req.echo,
                   "logprobs": req.logprobs is not None}  # fmt: skip
    for name, given in unsupported.items():
        if given:
            raise RequestError(f"'{name}' is not supported by this server: leave it out", name)
    return req


def completion_body(req, head: dict, texts, ids, reasons, prompt_tokens: int) -> dict:
    """A `text_completion` object: one choice per prompt, and the usage."""
    choices = []
    for i, (text, tokens, reason) in enumerate(zip(texts, ids, reasons, strict=True)):
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        if req.return_token_ids:
            choice["token_ids"] = tokens
        choices.append(choice)
    return {**head, "choices": choices, "usage": usage(prompt_tokens, sum(map(len, ids)))}


def choice_chunk(req, head: dict, index: int, event) -> dict:
    """One streamed chunk: the text an event adds to choice `index`."""
    choice = {"index": index, "text": event.text, "logprobs": None,
              "finish_reason": event.finish_reason}  # fmt: skip
    if req.return_token_ids:
        choice["token_ids"] = [event.token]
    return {**head, "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
