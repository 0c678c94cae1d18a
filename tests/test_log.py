"""Logging: JSON lines and console, run context on every line, secrets masked everywhere."""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from migrate import log as logsetup
from migrate import secrets
from migrate.errors import PermanentError
from migrate.secrets import Secret

log = structlog.get_logger("migrate.test")


@pytest.fixture
def sinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, io.StringIO]]:
    root = logging.getLogger()
    level = root.level
    # Values other tests in this worker revealed (vcsim's "pass", say) are masked everywhere,
    # even inside words like "password": start from none, so the assertions see only ours.
    monkeypatch.setattr(secrets, "_revealed", set())
    console = io.StringIO()
    path = logsetup.configure(tmp_path / "run", console=True, level="debug", console_stream=console)
    assert path == tmp_path / "run" / "log.jsonl"
    yield path, console
    logsetup.close()
    logsetup.set_run(None)
    root.setLevel(level)
    structlog.reset_defaults()


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_secrets_never_reach_the_file_or_the_console(sinks: tuple[Path, io.StringIO]) -> None:
    """Revealed values, secret-named keys (nested too) and secrets inside tracebacks are all masked."""
    path, console = sinks
    secret = Secret("S3cr3t/Pa55 word!", "env:PVE_PASSWORD")
    value = secret.reveal()
    log.info("login", user="root@pam", password="literal-never-revealed", secret=secret)
    log.info("request", body={"auth": {"api_token": "tok-123"}, "items": [{"key_passphrase": "kp-456"}]})
    log.info("url", url="https://pve1:8006/?pw=" + urllib.parse.quote(value, safe=""))
    log.info("said " + value)
    logging.getLogger("paramiko.transport").error("auth with %s failed", value)
    try:
        try:
            raise OSError(f"ssh refused {value}")
        except OSError as cause:
            raise PermanentError(f"login to pve1 failed with {value!r}", hint="check the token") from cause
    except PermanentError as exc:
        log.exception("login_failed")
        log.error("login_failed_again", exc_info=exc)

    text, shown = path.read_text(encoding="utf-8"), console.getvalue()
    for hidden in (value, urllib.parse.quote(value, safe=""), "literal-never-revealed", "tok-123", "kp-456"):
        assert hidden not in text, hidden
        assert hidden not in shown, hidden
    # Only this test's events: a thread left over from another test in this worker may log too.
    ours = (
        "login",
        "request",
        "url",
        "said ***",
        "auth with *** failed",
        "login_failed",
        "login_failed_again",
    )
    lines = [line for line in _lines(path) if line["event"] in ours]
    assert [line["event"] for line in lines] == list(ours)
    assert lines[0]["password"] == "***" and lines[0]["secret"] == "***" and lines[0]["user"] == "root@pam"
    assert lines[1]["body"] == {"auth": {"api_token": "***"}, "items": [{"key_passphrase": "***"}]}
    assert lines[3]["event"] == "said ***" and lines[4]["event"] == "auth with *** failed"
    exception = str(lines[5]["exception"])
    assert "Traceback" in exception and "OSError: ssh refused ***" in exception
    assert "PermanentError: login to pve1 failed with '***'" in exception
    assert "Traceback" in shown and "ssh refused ***" in shown
    assert "PermanentError: login to pve1 failed with '***'" in str(lines[6]["exception"])


def test_every_line_carries_the_run_id_even_from_foreign_threads(sinks: tuple[Path, io.StringIO]) -> None:
    """After set_run, lines from our code, a bare thread and a stdlib logger all carry run_id."""
    path, _ = sinks
    logsetup.set_run("r20300101-000000-abcd")
    log.info("main_thread")

    def elsewhere() -> None:  # a thread started by a library: no contextvars copied in
        log.info("bare_thread")
        logging.getLogger("urllib3.connectionpool").warning("retrying")

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    lines = _lines(path)
    assert [x["event"] for x in lines] == ["main_thread", "bare_thread", "retrying"]
    assert {x["run_id"] for x in lines} == {"r20300101-000000-abcd"}
    assert lines[2]["logger"] == "urllib3.connectionpool" and lines[2]["level"] == "warning"
    assert all("timestamp" in x for x in lines)


def test_bound_context_is_on_lines_inside_and_gone_after(sinks: tuple[Path, io.StringIO]) -> None:
    """bound(vm=, step=, attempt=) puts the keys on the block's lines only, in file and console."""
    path, console = sinks
    with logsetup.bound(wave=0, vm="vm-42", step="transfer", attempt=2):
        log.info("disk_transferred", bytes=1024)
    log.info("after")
    inside, after = _lines(path)
    assert (inside["wave"], inside["vm"], inside["step"], inside["attempt"], inside["bytes"]) == (
        0,
        "vm-42",
        "transfer",
        2,
        1024,
    )
    assert not {"vm", "step", "attempt"} & after.keys()
    assert "vm=vm-42" in console.getvalue() and "attempt=2" in console.getvalue()


def test_console_level_shows_less_than_the_file_keeps(tmp_path: Path) -> None:
    """With console_level=warning the terminal gets warnings only; the file keeps debug and info."""
    console = io.StringIO()
    root_level = logging.getLogger().level
    try:
        path = logsetup.configure(
            tmp_path / "m.jsonl", console=True, level="debug", console_level="warning", console_stream=console
        )
        assert path == tmp_path / "m.jsonl"
        log.debug("detail")
        log.info("progress")
        log.warning("careful")
        assert [x["event"] for x in _lines(path)] == ["detail", "progress", "careful"]
        shown = console.getvalue()
        assert "careful" in shown and "progress" not in shown and "detail" not in shown
    finally:
        logsetup.close()
        logging.getLogger().setLevel(root_level)
        structlog.reset_defaults()


def test_unknown_level_is_refused_with_the_choices() -> None:
    """A misspelt level names the valid ones instead of silently logging everything."""
    with pytest.raises(ValueError, match="unknown log level 'chatty'; use debug, info, warning or error"):
        logsetup.configure(None, console=False, level="chatty")


def test_capture_logs_sees_module_loggers_after_configure(sinks: tuple[Path, io.StringIO]) -> None:
    """Loggers are not cached, so structlog.testing.capture_logs() works on module loggers in tests."""
    log.info("before_capture")
    with structlog.testing.capture_logs() as captured:
        log.info("captured", n=1)
    assert captured == [{"event": "captured", "n": 1, "log_level": "info"}]


def test_mask_text_masks_longest_secret_first() -> None:
    """When one revealed secret contains another, the longer one is masked whole."""
    Secret("abc-").reveal()
    Secret("abc-defg-hij").reveal()
    assert logsetup.mask_text("x abc-defg-hij y abc- z") == "x *** y *** z"
