class OverlayError(Exception):
    """A failure the user can act on; its message is the one line we print."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail  # printed after the message, e.g. a diff
