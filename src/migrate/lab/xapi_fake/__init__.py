"""A fake XCP-ng pool (XAPI over XML-RPC plus ``/import_raw_vdi``), checked against XAPI's own
datamodel; see ``server.XapiFake`` (in-process) and ``launch.start_xapi`` (a lab process)."""

from migrate.lab.xapi_fake.faults import Faults
from migrate.lab.xapi_fake.seed import SEED
from migrate.lab.xapi_fake.server import XapiFake

__all__ = ["SEED", "Faults", "XapiFake"]
