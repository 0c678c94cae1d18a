"""migrate: move virtual machines from VMware vSphere to Proxmox VE and XCP-ng."""

__version__ = "0.1.0"
