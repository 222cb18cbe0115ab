"""The one error type the server's parts raise for a client's mistake (a leaf module)."""

from __future__ import annotations

from typing import Optional

#: OpenAI's error ``type`` for each status the server sends.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class ServeError(Exception):
    """A request the server refuses, with the HTTP status and a message meant for the client.

    Args:
        status: The HTTP status (4xx for the client's mistakes, 5xx for the server's state).
        message: One line saying what was wrong and, where it helps, what to do.
        param: The request field at fault, if one is.
    """

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        """The JSON body, in OpenAI's error shape (its clients read ``error.message``)."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}
