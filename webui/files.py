"""What Gradio's file route may serve of the runs folder: nothing directly.

The runs folder is in `allowed_paths` only so that Gradio may copy what a handler returns (a
sample, a tuner, a generated picture) into its cache; the page then fetches the copy, under a
URL derived from the file's content. Every file the UI hands out is such a copy, so a request
for a path inside the runs folder itself is never the UI's: it would read job.json, config.json,
train.log or the concept images of any run whose id is known. This middleware refuses those
requests before Gradio's route sees them, with the same answer Gradio gives a path it does not
serve.
"""

from __future__ import annotations

from pathlib import Path

from gradio.utils import is_in_or_equal
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

FILE_ROUTE = "/file="  # gradio's `/gradio_api/file={path}`; the path is the rest of the URL path


class PrivateFolder:
    """ASGI middleware: 403 for the file route's paths inside `folder`."""

    def __init__(self, app, folder: str | Path):
        self.app = app
        self.folder = Path(folder).resolve()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            _, found, target = scope.get("path", "").partition(FILE_ROUTE)
            if found and target and self._inside(target):
                await PlainTextResponse(f"File not allowed: {target}.", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _inside(self, target: str) -> bool:
        try:
            return is_in_or_equal(target, self.folder)
        except (OSError, ValueError):  # not a path at all (a NUL byte): nothing to serve either
            return True


def private(folder: str | Path) -> Middleware:
    return Middleware(PrivateFolder, folder=folder)
