"""Go template control structures, the function set, stand-in rendering and image references."""

from __future__ import annotations

import hashlib

import pytest

from tinkops.errors import RenderError
from tinkops.render import FUNCTIONS, render, render_placeholders
from tinkops.template import image_problem, line_map

CONTEXT = {
    "device_1": "08:00:27:00:00:01",
    "Hardware": {
        "Disks": ["/dev/nvme0n1", "/dev/sda"],
        "Interfaces": [{"DHCP": {"MAC": "08:00:27:00:00:01", "IP": {"Netmask": "255.255.252.0"}}}],
    },
    "hardware": {"spec": {"metadata": {"instance": {"id": "i-1"}}}},
    "values": {"mode": "fast", "empty": "", "items": {"b": "2", "a": "1"}},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ (index .Hardware.Interfaces 0).DHCP.MAC }}", "08:00:27:00:00:01"),
        ('{{ if eq .values.mode "fast" }}F{{ else }}S{{ end }}', "F"),
        ('{{ if ne .values.mode "fast" }}F{{ else if .values.mode }}M{{ end }}', "M"),
        ("{{ if and .values.mode (not .values.empty) }}yes{{ end }}", "yes"),
        ("{{ if or .values.empty .values.mode }}{{ .values.mode }}{{ end }}", "fast"),
        ("{{ range .Hardware.Disks }}[{{ . }}]{{ end }}", "[/dev/nvme0n1][/dev/sda]"),
        (
            "{{ range $i, $d := .Hardware.Disks }}{{ $i }}={{ $d }} {{ end }}",
            "0=/dev/nvme0n1 1=/dev/sda ",
        ),
        ("{{ range $k, $v := .values.items }}{{ $k }}{{ $v }}{{ end }}", "a1b2"),
        ("{{ range .values.nothing_here_either }}x{{ else }}none{{ end }}", None),
        ("{{ with .values.mode }}{{ . | upper }}{{ end }}", "FAST"),
        ("{{ $disk := index .Hardware.Disks 1 }}{{ formatPartition $disk 3 }}", "/dev/sda3"),
        ("{{ $.values.mode }}", "fast"),
        ("{{/* a comment */}}x", "x"),
        ("{{ .hardware.spec.metadata.instance.id }}", "i-1"),
        ('{{ .values.empty | default "stable" }}', "stable"),
        ('{{ "a,b" | splitList "," | join "-" }}', "a-b"),
        ('{{ trimPrefix "/dev/" (index .Hardware.Disks 0) }}', "nvme0n1"),
        ("{{ netmaskToPrefixLength (index .Hardware.Interfaces 0).DHCP.IP.Netmask }}", "22"),
        ('{{ toYaml (dict "a" "1") }}', "a: '1'"),
        ('{{ (fromYaml "a: 0600").a }}', "0600"),
        ('{{ toJson (list "x" 1) }}', '["x",1]'),
        ("{{ b64enc .values.mode | b64dec }}", "fast"),
        ("{{ add 1 2 | mul 3 }}", "9"),
        ("{{ sha256sum .values.mode | trunc 8 }}", hashlib.sha256(b"fast").hexdigest()[:8]),
        ("{{ .values.mode | quote }}", '"fast"'),
        ('{{ ternary "y" "n" true }}', "y"),
        ("{{ len .Hardware.Disks }}", "2"),
    ],
)
def test_go_forms_render(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(RenderError):
            render(text, CONTEXT)
        return
    assert render(text, CONTEXT) == expected


@pytest.mark.parametrize(
    ("text", "fragment", "line"),
    [
        ("a\n{{ if .values.mode }}\n", "is never closed", 2),
        ("{{ end }}", "without a matching", 1),
        ("x\ny\n{{ .values.nope }}", "'values.nope' is undefined", 3),
        ("{{ .nothing }}", "'nothing' is undefined", 1),
        ('{{ repeat 100000000 "x" }}', "over the limit", 1),
        ("{{ 'x' * 100000000 }}", "would exceed", 1),
        ("{{ 2 ** 100000 }}", "exponent", 1),
        ("{{ until 100000000 }}", "over 10000", 1),
        ("{% set x = 'ab' %}" + "{% set x = x ~ x %}" * 40, "a value grew", 1),
        ("{% macro f(x) %}{{ f(x ~ x) }}{% endmacro %}{{ f('a') }}", "a value grew", 1),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "too deeply", None),
        ('{{ fromYaml "a: &a [1,1,1,1,1,1,1,1,1,1]\\nb: [*a,*a,*a,*a,*a]" }}', None, None),
    ],
)
def test_bounded_errors(text: str, fragment: str | None, line: int | None) -> None:
    if fragment is None:
        render(text, CONTEXT)
        return
    with pytest.raises(RenderError) as caught:
        render(text, CONTEXT)
    assert fragment in caught.value.message
    assert caught.value.line == line


def test_functions_hermetic() -> None:
    for name in ("env", "expandenv", "getHostByName", "now", "randAlpha", "uuidv4", "lipsum"):
        assert name not in FUNCTIONS
    with pytest.raises(RenderError):
        render("{{ lipsum() }}", CONTEXT)


def test_placeholders_resolve_every_name() -> None:
    text = (
        'worker: "{{.device_9}}"\n'
        "disk: {{ formatPartition ( index .Hardware.Disks 0 ) 1 }}\n"
        "image: {{ .values.registry }}/image2disk:{{ .values.tag }}\n"
        "{{ range $i, $d := .Hardware.Disks }}d{{ $i }}: {{ $d }}\n{{ end }}"
        "timeout: {{ .values.timeout }}\n"
    )
    lines = render_placeholders(text).splitlines()
    assert lines[0].startswith('worker: "1')
    assert lines[2].split(": ")[1].count("/") == 1
    assert lines[4].split(": ")[1].isdigit()


def test_placeholders_report_unknown_function() -> None:
    with pytest.raises(RenderError) as caught:
        render_placeholders("x: 1\ny: {{ nosuch .a }}\n")
    assert caught.value.line == 2


@pytest.mark.parametrize(
    ("image", "valid"),
    [
        ("hello-world", True),
        ("quay.io/tinkerbell/actions/image2disk:v1.0.0", True),
        ("localhost:5000/lab/joiner:2024.05", True),
        ("registry.lab.local:5000/a/b@sha256:" + "a" * 64, True),
        ("alpine:3.19@sha256:" + "0" * 64, True),
        ("a__b/c--d", True),
        ("Alpine", False),
        ("quay.io/Tinkerbell/x", False),
        ("alpine:", False),
        ("alpine:bad tag", False),
        ("alpine@sha256:abc", False),
        ("-alpine", False),
        ("a" * 63, True),
        ("0" * 64, False),
        ("bad..name", False),
    ],
)
def test_image_references(image: str, valid: bool) -> None:
    assert (image_problem(image) is None) is valid, image_problem(image)


def test_line_map_aligns_changed_block() -> None:
    source = "a\n{{ x }}\nc\nd\n"
    rendered = "a\nline1\nline2\nc\nd\n"
    to_source = line_map(source, rendered)
    assert to_source(1) == 1
    assert to_source(4) == 3
    assert to_source(5) == 4
