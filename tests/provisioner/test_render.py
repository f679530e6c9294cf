"""Rendering: Jinja2 in a sandbox, and the Go-template forms of Tinkerbell's templates."""

from __future__ import annotations

import pytest

from tinkops.errors import RenderError
from tinkops.render import MAX_OUTPUT_BYTES, format_partition, render, translate_go

CONTEXT = {
    "device_1": "08:00:27:00:00:01",
    "Hardware": {"Disks": ["/dev/nvme0n1", "/dev/sda", "/dev/disk/by-id/wwn-0x5000"]},
    "values": {"image": "ubuntu.raw.gz"},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{.device_1}}", "08:00:27:00:00:01"),
        ("{{ .device_1 }}", "08:00:27:00:00:01"),
        ("{{ device_1 }}", "08:00:27:00:00:01"),
        ("{{ index .Hardware.Disks 0 }}", "/dev/nvme0n1"),
        ("{{ formatPartition ( index .Hardware.Disks 0 ) 1 }}", "/dev/nvme0n1p1"),
        ("{{ formatPartition (index .Hardware.Disks 1) 2 }}", "/dev/sda2"),
        ("{{ formatPartition ( index .Hardware.Disks 2 ) 3 }}", "/dev/disk/by-id/wwn-0x5000-part3"),
        ('{{ printf "%s-%d" .device_1 7 }}', "08:00:27:00:00:01-7"),
        ("{{ .values.image | upper }}", "UBUNTU.RAW.GZ"),
        ("{{ values.image }}", "ubuntu.raw.gz"),
        ("{{- .device_1 -}} x", "08:00:27:00:00:01x"),
    ],
)
def test_forms_render(text: str, expected: str) -> None:
    assert render(text, CONTEXT) == expected


@pytest.mark.parametrize(
    ("device", "number", "expected"),
    [
        ("/dev/sda", 1, "/dev/sda1"),
        ("/dev/vda", 2, "/dev/vda2"),
        ("/dev/nvme0n1", 1, "/dev/nvme0n1p1"),
        ("/dev/mmcblk0", 3, "/dev/mmcblk0p3"),
        ("/dev/disk/by-id/ata-X", 1, "/dev/disk/by-id/ata-X-part1"),
    ],
)
def test_format_partition_rules(device: str, number: int, expected: str) -> None:
    assert format_partition(device, number) == expected


def test_jinja_left_alone() -> None:
    text = "{% if device_1 %}{{ device_1 | lower }}{% endif %}"
    assert translate_go(text) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{{ .missing }}", "'missing' is undefined"),
        ("{{ missing }}", "'missing' is undefined"),
        ("{{ index .Hardware.Disks 9 }}", "out of range"),
        ("{{ nosuchfunction .device_1 }}", "not a known function"),
        ("{% for %}", "template syntax"),
        ("{{ ''.__class__ }}", "unsafe"),
    ],
)
def test_errors_named(text: str, fragment: str) -> None:
    with pytest.raises(RenderError) as caught:
        render(text, CONTEXT)
    assert fragment in str(caught.value)


def test_output_capped() -> None:
    with pytest.raises(RenderError) as caught:
        render("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", CONTEXT)
    assert str(MAX_OUTPUT_BYTES) in str(caught.value)
