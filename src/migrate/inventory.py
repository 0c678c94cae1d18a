"""Inventory files: which vSphere sources and which Proxmox VE / XCP-ng targets exist, and how
to reach them. Secrets are references (``env:``/``file:``), resolved here so that a missing
variable or file is reported with the inventory's line before anything is contacted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from migrate import secrets
from migrate.errors import ConfigError, Problem
from migrate.secrets import Secret
from migrate.yamlsource import LoadedYaml, load, validate


def _secret(value: Any, info: pydantic.ValidationInfo) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a secret reference; {secrets.REFERENCE_HELP}")
    base = (info.context or {}).get("base_dir")
    return secrets.resolve(value, Path(base) if base else None)


SecretRef = Annotated[
    Secret, pydantic.BeforeValidator(_secret), pydantic.PlainSerializer(lambda s: s.reference)
]
Port = Annotated[int, Field(ge=1, le=65535)]


def _existing_file(value: Path | None, info: pydantic.ValidationInfo, fix: str = "") -> Path | None:
    """A path from the inventory, relative to the inventory's folder, that must exist."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute() and base:
        path = Path(base) / path
    if not path.is_file():
        raise ValueError(f"{path} does not exist{fix}")
    return path


class _Spec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class TlsOptions(_Spec):
    verify_tls: bool = True
    ca_file: Path | None = None

    @pydantic.field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        return _existing_file(value, info, "; give the PEM file of the CA that signed the server")


class VsphereSpec(TlsOptions):
    type: Literal["vsphere"]
    host: str = Field(min_length=1)
    port: Port = 443
    user: str = Field(min_length=1)
    password: SecretRef


class SshSpec(_Spec):
    """How to reach the Proxmox nodes' shells (disk landing and import)."""

    user: str = "root"
    port: Port = 22
    key_file: Path
    key_passphrase: SecretRef | None = None
    known_hosts: Path | None = None
    # Node name -> address; a node not listed is reached by its name.
    hosts: dict[str, str] = Field(default_factory=dict)
    # Opting out of host key checking is explicit, like verify_tls: false.
    verify_host_key: bool = True

    @pydantic.field_validator("key_file", "known_hosts")
    @classmethod
    def _file_exists(cls, value: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        return _existing_file(value, info)

    def address(self, node: str) -> str:
        return self.hosts.get(node, node)


class ProxmoxSpec(TlsOptions):
    type: Literal["proxmox"]
    host: str = Field(min_length=1)
    port: Port = 8006
    token_id: str | None = Field(default=None, pattern=r"^[^@!\s]+@[^@!\s]+![A-Za-z0-9_.-]+$")
    token_secret: SecretRef | None = None
    user: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")
    password: SecretRef | None = None
    ssh: SshSpec
    # Storage with 'import' content where disks land before import-from (default: chosen per node).
    landing_storage: str = ""

    @pydantic.model_validator(mode="after")
    def _one_login(self) -> ProxmoxSpec:
        token = self.token_id is not None or self.token_secret is not None
        userpass = self.user is not None or self.password is not None
        if token == userpass:
            raise ValueError("give either token_id + token_secret (recommended) or user + password")
        if token and (self.token_id is None or self.token_secret is None):
            raise ValueError("token_id and token_secret go together")
        if userpass and (self.user is None or self.password is None):
            raise ValueError("user and password go together")
        return self


class XcpngSpec(TlsOptions):
    type: Literal["xcpng"]
    url: str = Field(pattern=r"^https?://[^/\s]+/?$")
    user: str = Field(min_length=1)
    password: SecretRef


TargetSpec = Annotated[ProxmoxSpec | XcpngSpec, Field(discriminator="type")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Inventory(_Spec):
    sources: dict[Name, Annotated[VsphereSpec, Field(discriminator="type")]] = Field(default_factory=dict)
    targets: dict[Name, TargetSpec] = Field(default_factory=dict)
    # Where this inventory came from, for messages; not part of the file.
    file: str = Field(default="", exclude=True)

    @pydantic.model_validator(mode="after")
    def _something(self) -> Inventory:
        if not self.sources and not self.targets:
            raise ValueError("an inventory needs at least one entry under 'sources' or 'targets'")
        return self

    def source(self, name: str | None) -> tuple[str, VsphereSpec]:
        if name is None:
            if len(self.sources) != 1:
                names = ", ".join(self.sources) or "none"
                raise ConfigError(
                    Problem(self.file, None, "$.sources", f"choose a source with --source (defined: {names})")
                )
            return next(iter(self.sources.items()))
        if name not in self.sources:
            raise ConfigError(
                Problem(
                    self.file,
                    None,
                    f"$.sources.{name}",
                    f"no such source; defined: {', '.join(self.sources) or 'none'}",
                )
            )
        return name, self.sources[name]


def load_inventory(path: Path | str) -> Inventory:
    loaded: LoadedYaml = load(path)
    base = Path(path).resolve().parent
    inv = validate(Inventory, loaded, context={"base_dir": str(base)})
    return inv.model_copy(update={"file": str(path)})
