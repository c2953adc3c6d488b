"""The part of vLLM's HTTP API that rollouts use, as field names and types.

Read from vLLM's source and docs, v0.18.2 (docs.vllm.ai/en/v0.18.2): the token-in/token-out
endpoint ``POST /inference/v1/generate`` (``vllm/entrypoints/serve/disagg/protocol.py``:
``GenerateRequest``, ``GenerateResponse``, ``GenerateResponseChoice``; the sampling fields are
vLLM's ``SamplingParams``; the log-probs are the chat API's ``ChatCompletionLogProbs``), the
runtime LoRA endpoints ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``
(enabled with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``), the model list
``GET /v1/models`` and ``GET /health``. vLLM itself was not run here (its wheel is CUDA-only):
``mtrl serve`` implements the same subset, and the tests check both sides against these
schemas.

Only the fields rollouts need are listed; a vLLM server accepts and returns more (a checker
allows extra fields in responses).
"""

from __future__ import annotations

from typing import Any

VLLM_VERSION = "0.18.2"

GENERATE = "/inference/v1/generate"
LOAD_LORA = "/v1/load_lora_adapter"
UNLOAD_LORA = "/v1/unload_lora_adapter"
MODELS = "/v1/models"
HEALTH = "/health"

_INT, _FLOAT, _STR, _BOOL, _LIST, _DICT, _NONE = int, (int, float), str, bool, list, dict, \
    type(None)

#: ``GenerateRequest``: the episode's token ids, the sampling parameters, the model (a served
#: model name or a LoRA adapter's ``lora_name``)
GENERATE_REQUEST: dict[str, Any] = {
    "request_id": _STR, "token_ids": _LIST, "sampling_params": _DICT,
    "model": (_STR, _NONE), "stream": (_BOOL, _NONE)}
GENERATE_REQUEST_REQUIRED = ("token_ids", "sampling_params")

#: vLLM ``SamplingParams`` fields used here (``top_k`` 0 or -1: off; ``logprobs`` 0: the
#: sampled token's log-prob only; ``seed``: per-request sampling seed)
SAMPLING_PARAMS: dict[str, Any] = {
    "n": _INT, "max_tokens": _INT, "temperature": _FLOAT, "top_p": _FLOAT, "top_k": _INT,
    "seed": (_INT, _NONE), "stop_token_ids": (_LIST, _NONE), "logprobs": (_INT, _NONE),
    "skip_special_tokens": _BOOL}

#: ``GenerateResponse`` and its ``GenerateResponseChoice``: the sampled ``token_ids`` (a stop
#: token that ended the turn included), one log-prob entry per sampled token in
#: ``logprobs.content``, ``finish_reason`` ``"stop"`` or ``"length"``
GENERATE_RESPONSE: dict[str, Any] = {"request_id": _STR, "choices": _LIST}
CHOICE: dict[str, Any] = {"index": _INT, "token_ids": _LIST, "logprobs": (_DICT, _NONE),
                          "finish_reason": (_STR, _NONE)}
LOGPROB_CONTENT: dict[str, Any] = {"token": _STR, "logprob": _FLOAT,
                                   "bytes": (_LIST, _NONE), "top_logprobs": _LIST}

LOAD_LORA_REQUEST: dict[str, Any] = {"lora_name": _STR, "lora_path": _STR}
UNLOAD_LORA_REQUEST: dict[str, Any] = {"lora_name": _STR}
#: ``GET /v1/models``: ``{"object": "list", "data": [card, ...]}``; a loaded adapter's card has
#: its ``lora_name`` as ``id`` and the base model as ``parent``
MODEL_LIST: dict[str, Any] = {"object": _STR, "data": _LIST}
MODEL_CARD: dict[str, Any] = {"id": _STR, "object": _STR, "root": (_STR, _NONE),
                              "parent": (_STR, _NONE)}


class ProtocolError(ValueError):
    pass


def check(obj: Any, schema: dict[str, Any], where: str, *, required: tuple[str, ...] = (),
          allow_extra: bool = True) -> dict[str, Any]:
    """``obj`` is a dict whose fields named in ``schema`` have its types (``required`` must be
    present); returns ``obj``. Raises :class:`ProtocolError` naming the field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise ProtocolError(f"{where}: missing field {key!r}")
    for key, value in obj.items():
        if key not in schema:
            if allow_extra:
                continue
            raise ProtocolError(f"{where}: unknown field {key!r}")
        want = schema[key]
        # JSON has no int/bool distinction problem for us except True being an int in Python
        if isinstance(value, bool) and want in (_INT, _FLOAT):
            raise ProtocolError(f"{where}: {key} must be a number, got a boolean")
        if not isinstance(value, want):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ProtocolError(f"{where}: {key} must be {names}, got {type(value).__name__}")
    return obj


def check_token_ids(ids: Any, where: str, vocab_size: int | None = None) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise ProtocolError(f"{where}: token_ids must be a non-empty list of integers")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or \
                (vocab_size is not None and t >= vocab_size):
            raise ProtocolError(f"{where}: token id {t!r} is not in [0, {vocab_size})")
    return ids


def check_generate_response(obj: Any) -> dict[str, Any]:
    """A ``/inference/v1/generate`` response with one choice, checked down to its log-probs."""
    check(obj, GENERATE_RESPONSE, "generate response", required=("choices",))
    if len(obj["choices"]) != 1:
        raise ProtocolError(f"generate response: expected 1 choice, got {len(obj['choices'])}")
    choice = check(obj["choices"][0], CHOICE, "choice", required=("token_ids",
                                                                   "finish_reason"))
    if choice["token_ids"]:
        check_token_ids(choice["token_ids"], "choice")
    lp = choice.get("logprobs")
    if lp is None or not isinstance(lp.get("content"), list):
        raise ProtocolError("choice: logprobs.content is missing (request logprobs: 0)")
    if len(lp["content"]) != len(choice["token_ids"]):
        raise ProtocolError(f"choice: {len(lp['content'])} log-probs for "
                            f"{len(choice['token_ids'])} tokens")
    for entry in lp["content"]:
        check(entry, LOGPROB_CONTENT, "logprobs.content[]", required=("logprob",))
    if choice["finish_reason"] not in ("stop", "length"):
        raise ProtocolError(f"choice: finish_reason {choice['finish_reason']!r}")
    return obj
