"""The lab fakes' control endpoint, ``POST <url>/_lab/<action>`` with a shared secret header:
fault injection and state for tests and the demo. One client for fakepve and the XAPI fake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from migrate.errors import LabError

CONTROL_HEADER = "X-Lab-Control"


def call_control(
    fake: str, url: str, secret_file: Path, ca_file: Path | None, action: str, params: dict[str, Any]
) -> Any:
    """Run ``action`` on the fake at ``url``; returns its data, or raises LabError saying why not."""
    try:
        resp = requests.post(
            f"{url.rstrip('/')}/_lab/{action}",
            json=params,
            # Passed per request: requests lets REQUESTS_CA_BUNDLE override a session's CA.
            verify=str(ca_file) if ca_file else True,
            headers={CONTROL_HEADER: secret_file.read_text().strip()},
            timeout=60,
        )
    except requests.RequestException as exc:
        raise LabError(f"{fake} control '{action}' failed: {exc}") from None
    if resp.status_code != 200:
        raise LabError(f"{fake} control '{action}' refused ({resp.status_code}): {resp.text.strip()}")
    return resp.json()["data"]
