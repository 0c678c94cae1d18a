"""structlog set-up: JSON lines to the run's log file, readable lines on stderr, secrets masked.

Both outputs go through the standard ``logging`` tree, so lines from paramiko, urllib3 or
proxmoxer get the same context, redaction and files as ours. Context (``run_id``, ``wave``,
``vm``, ``step``, ``attempt``) is bound by the runner with ``structlog.contextvars``.

Redaction runs on every event, last before rendering, in two passes:

* on the event dict: a value under a key that names a secret (``password``, ``token``,
  ``key_passphrase``...) is replaced at any depth, and every string has each value ever
  handed out by ``Secret.reveal()`` replaced;
* on the rendered line: the revealed values once more, which also covers exception text and
  tracebacks (they are rendered to text before the first pass, never by the console later).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from migrate import secrets

LOG_FILE_NAME = "log.jsonl"
MASK = "***"
CONTEXT_KEYS = ("run_id", "wave", "vm", "step", "attempt")

# Names, not values: a key like "password" is masked even when its value was never revealed
# (e.g. a literal in a request body a library logs).
_SECRET_KEY = re.compile(
    r"passw(or)?d|passphrase|^pass$|secret|token|api_?key|private_?key|authorization|cookie|credential",
    re.IGNORECASE,
)

# Turned into text by format_exc_info/StackInfoRenderer; that text is masked after rendering.
_RENDERED_LATER = frozenset({"exc_info", "stack_info"})

_handlers: list[logging.Handler] = []
# Threads the runner does not start (paramiko's transport, urllib3 pools) have no contextvars;
# one process runs one run, so the run id is also kept here and filled in where missing.
_run_id: str | None = None


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def _secret_texts() -> list[str]:
    texts: set[str] = set()
    for value in secrets.revealed_values():
        # Every length counts: masking a short value everywhere costs readability, leaking it costs more.
        texts.add(value)
        texts.add(urllib.parse.quote(value, safe=""))
        texts.add(urllib.parse.quote_plus(value))
        texts.add(repr(value)[1:-1])
    texts.discard("")
    # Longest first, so a secret that contains another is masked whole.
    return sorted(texts, key=len, reverse=True)


def mask_text(text: str, texts: list[str] | None = None) -> str:
    for value in _secret_texts() if texts is None else texts:
        if value in text:
            text = text.replace(value, MASK)
    return text


def _scrub(value: Any, texts: list[str]) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return mask_text(value, texts)
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and is_secret_key(k) else _scrub(v, texts) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, texts) for v in value]
    # Anything else is rendered by str() later anyway; do it here so the text can be masked.
    return mask_text(str(value), texts)


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask secret-named keys at any depth and every revealed secret value in the event."""
    texts = _secret_texts()
    return {
        k: v if k in _RENDERED_LATER else MASK if is_secret_key(k) else _scrub(v, texts)
        for k, v in event_dict.items()
    }


def _fill_run_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    if _run_id is not None:
        event_dict.setdefault("run_id", _run_id)
    return event_dict


class _MaskRendered:
    """Wrap a renderer so its output text is masked once more (the belt to redact's braces)."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        rendered = self._renderer(logger, name, event_dict)
        return mask_text(rendered if isinstance(rendered, str) else str(rendered))


class _Stderr:
    """Resolve sys.stderr at each write, so rich's live display (which swaps it) stays intact."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _pre_chain() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        _fill_run_id,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _formatter(renderer: Processor) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            # Tracebacks become text here, before redaction, so no renderer formats them later.
            structlog.processors.format_exc_info,
            redact,
            _MaskRendered(renderer),
        ],
    )


def log_file(run_dir_or_file: Path) -> Path:
    """The JSON log for a run directory, or the file itself when a ``.jsonl``/``.log`` name was given."""
    if run_dir_or_file.suffix in (".jsonl", ".json", ".log") and not run_dir_or_file.is_dir():
        return run_dir_or_file
    return run_dir_or_file / LOG_FILE_NAME


def _level(level: int | str) -> int:
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return numeric


def configure(
    run_dir_or_file: Path | None,
    *,
    console: bool,
    level: int | str = logging.INFO,
    console_level: int | str | None = None,
    console_stream: TextIO | None = None,
) -> Path | None:
    """Send logs to ``<run dir>/log.jsonl`` (JSON lines) and, if ``console``, to stderr.

    ``console_level`` (default: ``level``) lets the terminal show less than the file keeps.
    Safe to call again (e.g. once the run id is known): earlier handlers are closed first.
    Returns the JSON log's path, if any.
    """
    close()
    file_level = _level(level)
    term_level = file_level if console_level is None else _level(console_level)

    path: Path | None = None
    if run_dir_or_file is not None:
        path = log_file(run_dir_or_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(file_level)
        file_handler.setFormatter(_formatter(structlog.processors.JSONRenderer(sort_keys=False)))
        _handlers.append(file_handler)
    if console:
        stream: Any = console_stream if console_stream is not None else _Stderr()
        colors = bool(getattr(console_stream or sys.stderr, "isatty", lambda: False)())
        console_handler = logging.StreamHandler(stream)
        console_handler.setLevel(term_level)
        console_handler.setFormatter(
            _formatter(
                structlog.dev.ConsoleRenderer(
                    colors=colors, exception_formatter=structlog.dev.plain_traceback
                )
            )
        )
        _handlers.append(console_handler)
    root = logging.getLogger()
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(min(file_level, term_level) if console else file_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_pre_chain(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            # Masked before the record exists too, so any other handler on the root logger
            # (a library's, pytest's) never holds our events' secrets either.
            redact,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Off so structlog.testing.capture_logs() also sees module-level loggers in tests.
        cache_logger_on_first_use=False,
    )
    return path


def close() -> None:
    """Detach and close the handlers ``configure`` installed (end of a CLI run, tests)."""
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()


def set_run(run_id: str | None) -> None:
    """Bind ``run_id`` for this context and as the process-wide default for foreign threads."""
    global _run_id
    _run_id = run_id
    if run_id is None:
        structlog.contextvars.unbind_contextvars("run_id")
    else:
        structlog.contextvars.bind_contextvars(run_id=run_id)


@contextlib.contextmanager
def bound(**context: Any) -> Iterator[None]:
    """Bind log context for the block (e.g. ``vm=``, ``step=``), restoring the previous values."""
    with structlog.contextvars.bound_contextvars(**context):
        yield
