"""The build pipeline: fetch → config → per platform (build → tag → push) → manifest list.

``run.py`` orchestrates; each other module is one step. Runtimes (``bot.runtimes``) only
build, tag and push one platform's image.
"""


class StepError(Exception):
    """A pipeline step failed; ``kind`` says how (see docs/telemetry.md, Error kinds)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
