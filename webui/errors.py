"""Every handler's failures reach the page as one readable message, never a stack trace: the
project's own errors already say what to change (in the form's words: webui.forms.plain); anything
else is summarised and logged. A refusal is one line in the server's console, not a traceback."""

from __future__ import annotations

import errno
import functools
import html
import logging
import re
import traceback
from html.entities import html5

import gradio as gr

from restuning import ConfigError, TunerFileError
from trainers.images import ImageError
from trainers.service.jobs import JobError
from trainers.options import OptionError
from trainers.sampling import SamplingError
from trainers.service.uploads import UploadError

from .forms import plain

USER_ERRORS = (UploadError, ImageError, JobError, OptionError, ConfigError, TunerFileError, SamplingError)
log = logging.getLogger("restuning.studio")


# A toast renders its message as (sanitised) HTML and an API client reads the very same text, so
# a message stays plain text but for what a browser would read as markup: "<" opening a tag or
# comment, "&" opening a character reference (HTML's own table of names), so that a crafted file
# name does not become an image that fetches an outside address. Lines stay lines through the
# toast's CSS (webui.CSS), not <br>.
MARKUP = re.compile("<(?=[A-Za-z/!?])|&(?=#|" + "|".join(map(re.escape, html5)) + ")")


def as_html(message: str) -> str:
    """The message as plain text that a toast shows as it reads: one problem per line."""
    return MARKUP.sub(lambda m: html.escape(m.group()), message)


def refused(fn, message: str) -> None:
    log.warning("studio handler %s refused: %s", fn.__name__, " ".join(message.split()))


def friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            # a handler's own refusal: one line in the console (Gradio prints a traceback otherwise)
            exc.print_exception = False
            refused(fn, str(exc.message))
            raise
        except USER_ERRORS as exc:
            message = plain(str(exc))
            refused(fn, message)
            raise gr.Error(as_html(message), print_exception=False) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return _unexpected(fn, exc)
            log.error("studio handler %s: the disk is full: %s", fn.__name__, exc)
            raise gr.Error("The server's disk is full: this could not be saved (nothing half-written is kept). "
                           "Delete runs you no longer need, or try again later.", print_exception=False) from None
        except Exception as exc:
            return _unexpected(fn, exc)
    return wrapper


def _unexpected(fn, exc: Exception):
    """A failure no check foresaw: the visitor learns that it happened, not the server's paths or
    code (the message of an unforeseen error may name them); the console has the traceback."""
    log.error("studio handler %s failed:\n%s", fn.__name__, "".join(traceback.format_exception(exc)))
    raise gr.Error(f"Something went wrong ({type(exc).__name__}); the studio's console has details.",
                   print_exception=False) from None
