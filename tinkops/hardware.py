"""Hardware records (``hardware/<name>.yaml``): Tinkerbell's hardware fields, plus agent keys."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tinkops.errors import Problem
from tinkops.schema import Reader
from tinkops.yamltext import Document
from tinkops_agent.protocol import canonical_worker, normalize_mac

TOP_KEYS = (
    "id",
    "metadata",
    "network",
    "disks",
    "agent",
    "version",
    "userData",
    "vendorData",
    "bmcRef",
    "tinkVersion",
)
INTERFACE_KEYS = ("dhcp", "netboot", "disableDhcp")
DHCP_KEYS = (
    "mac",
    "ip",
    "hostname",
    "lease_time",
    "name_servers",
    "time_servers",
    "arch",
    "uefi",
    "iface_name",
    "vlan_id",
)
IP_KEYS = ("address", "netmask", "gateway", "family")
NETBOOT_KEYS = ("allow_pxe", "allow_workflow", "allowPXE", "allowWorkflow", "ipxe", "osie")
AGENT_KEYS = ("keys", "id")
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
)


@dataclass(frozen=True)
class Interface:
    mac: str
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    hostname: str | None = None
    allow_pxe: bool | None = None
    allow_workflow: bool | None = None


@dataclass(frozen=True)
class Hardware:
    """One machine that can run workflows."""

    name: str
    file: str
    id: str
    interfaces: tuple[Interface, ...]
    disks: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    agent_keys: tuple[str, ...] = ()
    agent_id: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def macs(self) -> tuple[str, ...]:
        return tuple(interface.mac for interface in self.interfaces)

    @property
    def worker_ids(self) -> tuple[str, ...]:
        """Return every id a task's ``worker`` may use for this machine (MACs, agent id)."""
        ids = list(self.macs)
        if self.agent_id:
            ids.append(canonical_worker(self.agent_id))
        return tuple(ids)

    def template_data(self) -> dict[str, Any]:
        """Return what templates see as ``.Hardware``: Tinkerbell's names, plus the record."""
        return {
            "Disks": list(self.disks),
            "Interfaces": [
                {
                    "DHCP": {
                        "MAC": i.mac,
                        "IP": {"Address": i.ip, "Netmask": i.netmask, "Gateway": i.gateway},
                        "Hostname": i.hostname,
                    }
                }
                for i in self.interfaces
            ],
            "Metadata": dict(self.metadata),
            "ID": self.id,
            "Name": self.name,
            "spec": dict(self.raw),
        }


def parse_hardware(name: str, document: Document, problems: list[Problem]) -> Hardware | None:
    """Validate a hardware record; return it, or None with the problems appended."""
    reader = Reader(document, problems)
    before = len(problems)
    top = reader.mapping((), TOP_KEYS, required=("id",))
    if top is None:
        return None
    record_id = reader.string(("id",)) or ""

    interfaces = []
    reader.mapping(("network",), ("interfaces",), optional=True)
    for index, _ in enumerate(reader.sequence(("network", "interfaces"))):
        interface = _parse_interface(reader, ("network", "interfaces", index))
        if interface is not None:
            interfaces.append(interface)
    if not interfaces and len(problems) == before:
        reader.problem(
            ("network", "interfaces"),
            "no interface with a MAC address",
            "add network.interfaces[].dhcp.mac",
        )
    _check_duplicate_macs(reader, interfaces)

    disks = []
    for index, _ in enumerate(reader.sequence(("disks",))):
        disk = reader.mapping(("disks", index), ("device",), required=("device",))
        device = reader.string(("disks", index, "device")) if disk else None
        if device:
            disks.append(device)

    agent = reader.mapping(("agent",), AGENT_KEYS, optional=True) or {}
    keys = reader.string_list(("agent", "keys")) or ()
    for index, key in enumerate(keys):
        if key.split(" ", 1)[0] not in KEY_TYPES or len(key.split()) < 2:
            reader.problem(
                ("agent", "keys", index),
                f"{key[:40]!r} is not an OpenSSH public key",
                "paste one line of a .pub file, e.g. 'ssh-ed25519 AAAA... name'",
            )
    agent_id = reader.string(("agent", "id")) if agent else None
    metadata = reader.mapping(("metadata",), optional=True) or {}

    if len(problems) > before:
        return None
    return Hardware(
        name=name,
        file=document.file,
        id=record_id,
        interfaces=tuple(interfaces),
        disks=tuple(disks),
        metadata=metadata,
        agent_keys=tuple(keys),
        agent_id=agent_id,
        raw=top,
    )


def _parse_interface(reader: Reader, path: tuple[str | int, ...]) -> Interface | None:
    reader.mapping(path, INTERFACE_KEYS, required=("dhcp",))
    dhcp = reader.mapping((*path, "dhcp"), DHCP_KEYS, required=("mac",), optional=True)
    if dhcp is None:
        return None
    mac_text = reader.string((*path, "dhcp", "mac"))
    if mac_text is None:
        return None
    try:
        mac = normalize_mac(mac_text)
    except ValueError:
        reader.problem(
            (*path, "dhcp", "mac"),
            f"{mac_text!r} is not a MAC address",
            "write six hex pairs like 08:00:27:00:00:01",
        )
        return None

    ip = netmask = gateway = None
    if reader.mapping((*path, "dhcp", "ip"), IP_KEYS, optional=True) is not None:
        ip = _address(reader, (*path, "dhcp", "ip", "address"))
        netmask = _address(reader, (*path, "dhcp", "ip", "netmask"))
        gateway = _address(reader, (*path, "dhcp", "ip", "gateway"))
    reader.string_list((*path, "dhcp", "name_servers"))
    reader.boolean((*path, "dhcp", "uefi"))
    netboot = reader.mapping((*path, "netboot"), NETBOOT_KEYS, optional=True) or {}
    allow_pxe = reader.boolean((*path, "netboot", "allow_pxe")) if netboot else None
    allow_workflow = reader.boolean((*path, "netboot", "allow_workflow")) if netboot else None
    return Interface(
        mac=mac,
        ip=ip,
        netmask=netmask,
        gateway=gateway,
        hostname=reader.string((*path, "dhcp", "hostname")),
        allow_pxe=allow_pxe,
        allow_workflow=allow_workflow,
    )


def _address(reader: Reader, path: tuple[str | int, ...]) -> str | None:
    value = reader.string(path)
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        reader.problem(path, f"{value!r} is not an IP address", "write it like 192.168.1.10")
        return None


def _check_duplicate_macs(reader: Reader, interfaces: list[Interface]) -> None:
    seen: set[str] = set()
    for index, interface in enumerate(interfaces):
        if interface.mac in seen:
            reader.problem(
                ("network", "interfaces", index, "dhcp", "mac"),
                f"MAC {interface.mac} appears twice in this record",
                "remove the duplicate interface",
            )
        seen.add(interface.mac)


def index_by_worker(
    records: Mapping[str, Hardware], problems: list[Problem]
) -> dict[str, Hardware]:
    """Return every worker id mapped to its record; a MAC owned twice is a problem."""
    owners: dict[str, Hardware] = {}
    for record in sorted(records.values(), key=lambda r: r.file):
        for worker in record.worker_ids:
            owner = owners.get(worker)
            if owner is not None and owner.name != record.name:
                problems.append(
                    Problem(
                        record.file,
                        None,
                        "network.interfaces",
                        f"{worker} is already owned by {owner.file}",
                        "each MAC and agent id must belong to one record",
                    )
                )
                continue
            owners[worker] = record
    return owners
