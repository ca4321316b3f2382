"""The server's error vocabulary: OpenAI/vLLM-shaped bodies ``{"error": {message, type, param, code}}``.

| status | type                  | when                                                              |
|--------|-----------------------|-------------------------------------------------------------------|
| 400    | invalid_request_error | malformed JSON, wrong types, missing fields, values over a limit  |
| 401    | authentication_error  | missing or wrong API key (only with ``--api-key-env``)            |
| 404    | not_found_error       | unknown route or unknown model name                               |
| 405    | invalid_request_error | wrong HTTP method on a known route                                |
| 413    | invalid_request_error | request body over ``--max-body-bytes``                            |
| 429    | rate_limit_error      | the generation queue is full (``--max-queue``); retry later       |
| 499    | client_closed_request | the client disconnected (nobody reads it; logged and counted)     |
| 500    | internal_error        | a bug or a device fault; the message carries the request id only  |
| 503    | service_unavailable   | the server is shutting down                                       |
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error a client gets as JSON with ``status``; raised anywhere under a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class QueueFull(APIError):
    def __init__(self, waiting: int, wanted: int, capacity: int):
        super().__init__(
            429,
            f"the server is busy: {waiting} generations queued, this request needs {wanted}, capacity "
            f"{capacity}; retry later",
            type="rate_limit_error",
            code="queue_full",
        )


class ShuttingDown(APIError):
    def __init__(self):
        super().__init__(503, "the server is shutting down", type="service_unavailable", code="shutting_down")


class ClientGone(APIError):
    def __init__(self):
        super().__init__(499, "the client disconnected", type="client_closed_request", code="client_disconnected")


def internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"internal server error (request id {request_id}; the server log has the details)",
        type="internal_error",
        code="internal_error",
    )
