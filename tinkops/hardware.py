"""Hardware records (``hardware/<name>.yaml``): Tinkerbell's hardware fields, plus agent keys.

Two shapes are read, both as Tinkerbell wrote them:

- the document of Tinkerbell v0.6 (``tink hardware push``): ``id``, ``metadata``,
  ``network.interfaces[]``, plus ``disks``, ``userData`` and ``vendorData`` from later eras;
- the ``Hardware`` custom resource (``apiVersion: tinkerbell.org/v1alpha1``): ``metadata.name``
  and a ``spec`` with ``interfaces[]``, ``metadata``, ``disks`` and the rest.

Either may carry ``agent: {keys, id}``: the SSH public keys the machine's agent authenticates
with, and an optional worker id other than its MACs.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tinkops.errors import Problem
from tinkops.jsontext import json_as_text
from tinkops.schema import Reader, field_name
from tinkops.yamltext import Document, Path_
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
RESOURCE_KEYS = ("apiVersion", "kind", "metadata", "spec", "status", "agent")
SPEC_KEYS = (
    "interfaces",
    "metadata",
    "disks",
    "userData",
    "vendorData",
    "bmcRef",
    "resources",
    "tinkVersion",
    "agentID",
    "auto",
    "references",
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
IPXE_KEYS = ("url", "contents")
OSIE_KEYS = ("base_url", "baseURL", "kernel", "initrd")
AGENT_KEYS = ("keys", "id")
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
)
RESOURCE_API_GROUP = "tinkerbell.org/"
MAX_VLAN_ID = 4096
# Words that Go writes in capitals inside field names (``DHCP.MAC``, ``Netboot.AllowPXE``).
_INITIALISMS = frozenset(
    {"api", "cpu", "dhcp", "dns", "http", "https", "id", "ip", "ipxe", "json", "mac"}
    | {"osie", "pxe", "ssh", "uefi", "url", "uuid", "vlan"}
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
    line: int | None = field(default=None, compare=False)
    ip_line: int | None = field(default=None, compare=False)
    path: str = field(default="", compare=False)
    """The interface's field path in its file, e.g. ``network.interfaces[1]``."""


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
    spec: Mapping[str, Any] = field(default_factory=dict)
    """The record in the shape of the custom resource's ``spec`` (JSON field names)."""
    id_line: int | None = field(default=None, compare=False)

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
        """Return what templates see as ``.Hardware``: Tinkerbell's Go field names.

        ``Disks`` is the list of device paths; ``Interfaces`` and ``Metadata`` carry both
        the JSON names and Go's (``(index .Hardware.Interfaces 0).DHCP.MAC``).
        """
        interfaces = [go_names(item) for item in self.spec.get("interfaces") or []]
        for interface, parsed in zip(interfaces, self.interfaces, strict=False):
            if isinstance(interface.get("DHCP"), dict):
                interface["DHCP"]["MAC"] = parsed.mac
        return {
            "Disks": list(self.disks),
            "Interfaces": interfaces,
            "Metadata": go_names(dict(self.metadata)),
            "UserData": self.spec.get("userData") or "",
            "VendorData": self.spec.get("vendorData") or "",
            "ID": self.id,
            "Name": self.name,
            "spec": dict(self.spec),
        }

    def resource(self) -> dict[str, Any]:
        """Return the record as Tinkerbell's custom resource (mono's ``.hardware``)."""
        return {
            "apiVersion": "tinkerbell.org/v1alpha1",
            "kind": "Hardware",
            "metadata": {"name": self.name},
            "spec": dict(self.spec),
        }


def is_resource(value: object) -> bool:
    """Return whether a document is a ``Hardware`` custom resource, not a v0.6 document."""
    return isinstance(value, dict) and ("spec" in value or "apiVersion" in value)


def parse_hardware(name: str, document: Document, problems: list[Problem]) -> Hardware | None:
    """Validate a hardware record of either shape; return it, or None with problems added."""
    reader = Reader(document, problems)
    before = len(problems)
    if is_resource(reader.document.value):
        parsed = _parse_resource(name, reader)
    else:
        parsed = _parse_document(reader)
    if parsed is None:
        return None
    record_id, base, top = parsed

    interfaces = []
    for index, _ in enumerate(reader.sequence((*base, "interfaces"))):
        interface = _parse_interface(reader, (*base, "interfaces", index))
        if interface is not None:
            interfaces.append(interface)
    if not interfaces and len(reader.problems) == before:
        reader.problem(
            (*base, "interfaces"),
            "no interface with a MAC address",
            "add an interface with dhcp.mac",
        )
    _check_duplicate_macs(reader, base, interfaces)
    disks = _parse_disks(reader, base)
    metadata = _parse_metadata(reader, (*_spec(base), "metadata"))
    keys, agent_id = _parse_agent(reader)
    if base != ("network",) and agent_id is None:
        agent_id = reader.string(("spec", "agentID")) or None

    if len(reader.problems) > before:
        return None
    return Hardware(
        name=name,
        file=reader.file,
        id=record_id,
        interfaces=tuple(interfaces),
        disks=tuple(disks),
        metadata=metadata,
        agent_keys=keys,
        agent_id=agent_id,
        raw=top,
        spec=_spec_of(reader, base, metadata),
        id_line=document.line(("id",) if base == ("network",) else ("metadata", "name")),
    )


def _spec(base: Path_) -> Path_:
    return () if base == ("network",) else ("spec",)


def _parse_document(reader: Reader) -> tuple[str, Path_, dict[str, Any]] | None:
    top = reader.mapping((), TOP_KEYS, required=("id",))
    if top is None:
        return None
    reader.mapping(("network",), ("interfaces",), optional=True)
    for key in ("userData", "vendorData", "tinkVersion", "version"):
        reader.string((key,))
    return reader.string(("id",)) or "", ("network",), top


def _parse_resource(name: str, reader: Reader) -> tuple[str, Path_, dict[str, Any]] | None:
    top = reader.mapping((), RESOURCE_KEYS, required=("spec",))
    if top is None:
        return None
    api_version = reader.string(("apiVersion",))
    if api_version is not None and not api_version.startswith(RESOURCE_API_GROUP):
        reader.problem(
            ("apiVersion",),
            f"{api_version!r} is not a Tinkerbell API version",
            "write apiVersion: tinkerbell.org/v1alpha1",
        )
    kind = reader.string(("kind",))
    if kind is not None and kind != "Hardware":
        reader.problem(("kind",), f"kind {kind!r} is not Hardware", "write kind: Hardware")
    reader.mapping(("metadata",), optional=True)
    declared = reader.string(("metadata", "name"))
    if declared is not None and declared != name:
        reader.problem(
            ("metadata", "name"),
            f"metadata.name {declared!r} differs from the file name {name!r}",
            f"rename the file to hardware/{declared}.yaml or change metadata.name",
        )
    reader.mapping(("spec",), SPEC_KEYS)
    for key in ("userData", "vendorData", "tinkVersion", "agentID"):
        reader.string(("spec", key))
    reader.boolean(("spec", "auto"))
    return declared or name, ("spec",), top


def _parse_interface(reader: Reader, path: Path_) -> Interface | None:
    if reader.mapping(path, INTERFACE_KEYS, required=("dhcp",)) is None:
        return None
    reader.boolean((*path, "disableDhcp"))
    dhcp = (*path, "dhcp")
    if reader.mapping(dhcp, DHCP_KEYS, required=("mac",), optional=True) is None:
        return None
    mac_text = reader.string((*dhcp, "mac"))
    mac = None
    try:
        mac = normalize_mac(mac_text) if mac_text is not None else None
    except ValueError:
        reader.problem(
            (*dhcp, "mac"),
            f"{mac_text!r} is not a MAC address",
            "write six hex pairs like 08:00:27:00:00:01",
        )

    ip = netmask = gateway = None
    if reader.mapping((*dhcp, "ip"), IP_KEYS, optional=True) is not None:
        ip = _address(reader, (*dhcp, "ip", "address"))
        netmask = _netmask(reader, (*dhcp, "ip", "netmask"))
        gateway = _address(reader, (*dhcp, "ip", "gateway"))
        family = reader.string((*dhcp, "ip", "family"))
        if family not in (None, "", "0", "4", "6"):
            reader.problem((*dhcp, "ip", "family"), f"{family!r} is not 4 or 6", "write 4 or 6")
    for key in ("name_servers", "time_servers"):
        for index, server in enumerate(reader.string_list((*dhcp, key)) or ()):
            if key == "name_servers":
                _check_ip(reader, (*dhcp, key, index), server)
    for key in ("hostname", "arch", "iface_name"):
        reader.string((*dhcp, key))
    reader.integer((*dhcp, "lease_time"), minimum=0)
    vlan = reader.integer((*dhcp, "vlan_id"), minimum=0)
    if vlan is not None and vlan > MAX_VLAN_ID:
        reader.problem((*dhcp, "vlan_id"), f"VLAN {vlan} is over {MAX_VLAN_ID}", "fix the VLAN")
    reader.boolean((*dhcp, "uefi"))
    allow_pxe, allow_workflow = _parse_netboot(reader, (*path, "netboot"))
    if mac is None:
        return None
    return Interface(
        mac=mac,
        ip=ip,
        netmask=netmask,
        gateway=gateway,
        hostname=reader.string((*dhcp, "hostname")) or None,
        allow_pxe=allow_pxe,
        allow_workflow=allow_workflow,
        line=reader.document.line((*dhcp, "mac")),
        ip_line=reader.document.line((*dhcp, "ip", "address")),
        path=field_name(path),
    )


def _parse_netboot(reader: Reader, path: Path_) -> tuple[bool | None, bool | None]:
    if reader.mapping(path, NETBOOT_KEYS, optional=True) is None:
        return None, None
    reader.mapping((*path, "ipxe"), IPXE_KEYS, optional=True)
    reader.mapping((*path, "osie"), OSIE_KEYS, optional=True)
    allow_pxe = reader.boolean((*path, "allow_pxe"))
    camel_pxe = reader.boolean((*path, "allowPXE"))
    allow_workflow = reader.boolean((*path, "allow_workflow"))
    camel_workflow = reader.boolean((*path, "allowWorkflow"))
    return (
        allow_pxe if allow_pxe is not None else camel_pxe,
        allow_workflow if allow_workflow is not None else camel_workflow,
    )


def _address(reader: Reader, path: Path_) -> str | None:
    value = reader.string(path)
    if not value:
        return None
    return _check_ip(reader, path, value)


def _check_ip(reader: Reader, path: Path_, value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        reader.problem(path, f"{value!r} is not an IP address", "write it like 192.168.1.10")
        return None


def _netmask(reader: Reader, path: Path_) -> str | None:
    value = reader.string(path)
    if not value:
        return None
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{value}")
    except ValueError:
        reader.problem(
            path, f"{value!r} is not a netmask", "write it like 255.255.255.0 (or a prefix length)"
        )
        return None
    return value


def _parse_disks(reader: Reader, base: Path_) -> list[str]:
    disks_path = (*_spec(base), "disks")
    disks = []
    for index, _ in enumerate(reader.sequence(disks_path)):
        if reader.mapping((*disks_path, index), ("device",), required=("device",)) is None:
            continue
        device = reader.string((*disks_path, index, "device"))
        if device and not device.startswith("/"):
            reader.problem(
                (*disks_path, index, "device"),
                f"{device!r} is not a device path",
                "write the full path, e.g. /dev/sda or /dev/nvme0n1",
            )
        elif device:
            disks.append(device)
    return disks


def _parse_metadata(reader: Reader, path: Path_) -> dict[str, Any]:
    value = reader.get(path)
    if isinstance(value, str):
        # Tinkerbell v0.6 carried metadata as a JSON document inside a string.
        try:
            decoded = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            decoded = None
        if not isinstance(decoded, dict):
            reader.problem(path, "metadata is text but not a JSON object", "write a mapping")
            return {}
        text: dict[str, Any] = json_as_text(decoded)
        return text
    return reader.mapping(path, optional=True) or {}


def _parse_agent(reader: Reader) -> tuple[tuple[str, ...], str | None]:
    if reader.mapping(("agent",), AGENT_KEYS, optional=True) is None:
        return (), None
    keys = reader.string_list(("agent", "keys")) or ()
    for index, key in enumerate(keys):
        if key.split(" ", 1)[0] not in KEY_TYPES or len(key.split()) < 2:
            reader.problem(
                ("agent", "keys", index),
                f"{key[:40]!r} is not an OpenSSH public key",
                "paste one line of a .pub file, e.g. 'ssh-ed25519 AAAA... name'",
            )
    return keys, reader.string(("agent", "id")) or None


def _spec_of(reader: Reader, base: Path_, metadata: dict[str, Any]) -> dict[str, Any]:
    """Return the record in the custom resource's ``spec`` shape."""
    if base == ("spec",):
        spec = dict(reader.get(("spec",)) or {})
    else:
        spec = {
            key: reader.get((key,))
            for key in ("disks", "userData", "vendorData", "tinkVersion")
            if reader.get((key,)) is not None
        }
        spec["interfaces"] = list(reader.get(("network", "interfaces")) or [])
    spec["metadata"] = metadata
    return spec


def _check_duplicate_macs(reader: Reader, base: Path_, interfaces: list[Interface]) -> None:
    seen: set[str] = set()
    for index, interface in enumerate(interfaces):
        if interface.mac in seen:
            reader.problem(
                (*base, "interfaces", index, "dhcp", "mac"),
                f"MAC {interface.mac} appears twice in this record",
                "remove the duplicate interface",
            )
        seen.add(interface.mac)


def go_names(value: Any) -> Any:
    """Return ``value`` with each mapping key also under its Go field name.

    ``lease_time`` is also ``LeaseTime``, ``allowPXE`` also ``AllowPXE`` and ``vlan_id``
    also ``VLANID``; Go writes initialisms in capitals, but some of Tinkerbell's structs do
    not (``AllowPxe``), so the plain capitalised form is added as well.
    """
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            converted = go_names(item)
            words = [w for w in re.split(r"_|(?<=[a-z0-9])(?=[A-Z])", str(key)) if w]
            plain = "".join(word[:1].upper() + word[1:].lower() for word in words)
            go = "".join(
                w.upper() if w.lower() in _INITIALISMS else w[:1].upper() + w[1:] for w in words
            )
            for name in (plain, go, str(key)):
                result[name] = converted
        return result
    if isinstance(value, list):
        return [go_names(item) for item in value]
    return value


def index_by_worker(
    records: Mapping[str, Hardware], problems: list[Problem]
) -> dict[str, Hardware]:
    """Return every worker id mapped to its record; a MAC or IP owned twice is a problem."""
    owners: dict[str, Hardware] = {}
    addresses: dict[str, Hardware] = {}
    contested: set[str] = set()
    for record in sorted(records.values(), key=lambda r: r.file):
        for worker in record.worker_ids:
            owner = owners.get(worker)
            if owner is not None and owner.name != record.name:
                # Neither record gets the MAC: a request for it must not run on whichever
                # file happens to sort first, with that file's disks and keys.
                contested.add(worker)
                claims = (
                    (record, f"is already owned by {owner.file}"),
                    (owner, f"is also claimed by {record.file}"),
                )
                for claimant, claim in claims:
                    interface = next((i for i in claimant.interfaces if i.mac == worker), None)
                    problems.append(
                        Problem(
                            claimant.file,
                            interface.line if interface else claimant.id_line,
                            f"{interface.path}.dhcp.mac" if interface else "agent.id",
                            f"{worker} {claim}; no workflow runs on it until one record "
                            "gives it up",
                            "each MAC and agent id must belong to one record",
                        )
                    )
                continue
            owners[worker] = record
        for interface in record.interfaces:
            if interface.ip is None:
                continue
            other = addresses.setdefault(interface.ip, record)
            if other.name != record.name:
                problems.append(
                    Problem(
                        record.file,
                        interface.ip_line,
                        f"{interface.path}.dhcp.ip.address",
                        f"IP address {interface.ip} is already used by {other.file}",
                        "give every machine its own address",
                    )
                )
    for worker in contested:
        owners.pop(worker, None)
    return owners


def find_duplicate_ids(records: Mapping[str, Hardware], problems: list[Problem]) -> None:
    """Append a problem for each record whose ``id`` another record already has."""
    seen: dict[str, Hardware] = {}
    for record in sorted(records.values(), key=lambda r: r.file):
        if not record.id:
            continue
        other = seen.setdefault(record.id, record)
        if other is not record:
            problems.append(
                Problem(
                    record.file,
                    record.id_line,
                    "id",
                    f"id {record.id!r} is already used by {other.file}",
                    "give every machine its own id (a UUID)",
                )
            )
