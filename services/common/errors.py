"""Domain errors that every service maps to gRPC status codes in one place
(services/common/grpc_server.py), so that domain code never touches grpc."""


class InvalidArgumentError(ValueError):
    """Bad input. The message names the field and the limit it broke."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhaustedError(RuntimeError):
    """The server is full right now; the caller may retry later."""


class UnavailableError(RuntimeError):
    """A peer the request depends on is not reachable or failed."""


class RemoteError(RuntimeError):
    """A peer's refusal or failure of one request, passed on with the peer's status code
    (a gRPC status code number) and message unchanged."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RateLimitedError(ResourceExhaustedError):
    """The caller's own rate limit is spent; it may retry after `retry_after_s` seconds,
    which the answer carries (gRPC `retry-after` metadata, HTTP `Retry-After`)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, as HTTP's Retry-After has them."""
        return str(max(1, -int(-self.retry_after_s // 1)))
