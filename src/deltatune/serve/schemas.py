"""Request bodies (pydantic models: FastAPI checks them and describes them in ``/openapi.json``).

Fields OpenAI's clients may send that the server does not use are accepted and ignored, as OpenAI-
compatible servers do; fields it uses are checked, and a wrong value is a 400 naming the field.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

#: A text, texts, token ids, or lists of token ids (OpenAI's ``input``).
Inputs = Union[str, list[str], list[int], list[list[int]]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str = Field(description="the base model's served name, or a loaded adapter's name")
    input: Inputs = Field(description="a text, a list of texts, token ids, or a list of token-id lists")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="must be the model's embedding size if given")
    user: Optional[str] = None


class ClassifyRequest(_Body):
    """``POST /classify`` (vLLM's shape)."""

    model: str = Field(description="a loaded adapter with a classification head")
    input: Inputs
    user: Optional[str] = None


class LoadAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter`` (vLLM's route and fields)."""

    lora_name: str = Field(description="the name requests will use in their model field")
    lora_path: str = Field(description="the adapter folder, relative to --adapter-root or absolute inside it")


class UnloadAdapterRequest(_Body):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str
    lora_int_id: Optional[int] = None  # vLLM clients may send it; names identify adapters here


class _Sampling(_Body):
    max_tokens: Optional[int] = Field(None, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = Field(None, description="up to 4 strings that end the text")
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    stream: bool = False
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    model: str
    prompt: Inputs
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="log-probabilities of each output token "
                                    "and of its N most likely alternatives (not with stream)")
    echo: bool = Field(False, description="the prompt comes back before the completion (with logprobs: its tokens "
                                          "scored too, the first one null)")


class ChatMessage(_Body):
    role: str
    content: str


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions`` (models whose tokenizer has a chat template)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


def as_list(value: Inputs) -> list:
    """``input`` as a list of items, each a text or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)
