"""Every handler's failures reach the page as one readable message, never a stack trace: the
project's own errors already say what to change; anything else is summarised and logged."""

from __future__ import annotations

import functools
import html
import logging
import traceback

import gradio as gr

from restuning import ConfigError, TunerFileError
from trainers.images import ImageError
from trainers.jobs import JobError
from trainers.options import OptionError
from trainers.sampling import SamplingError
from trainers.uploads import UploadError

USER_ERRORS = (UploadError, ImageError, JobError, OptionError, ConfigError, TunerFileError, SamplingError)
log = logging.getLogger("restuning.studio")


def as_html(message: str) -> str:
    """Toasts render HTML: escape the message, keep its one-problem-per-line layout."""
    return "<br>".join(html.escape(line) for line in message.splitlines())


def friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise gr.Error(as_html(str(exc)), print_exception=False) from None
        except Exception as exc:
            log.error("studio handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(as_html(f"Something went wrong ({type(exc).__name__}: {exc}); the studio's console has details."),
                           print_exception=False) from None
    return wrapper
