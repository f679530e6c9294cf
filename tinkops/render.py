"""Rendering templates: Jinja2 in a sandbox, plus the Go-template forms Tinkerbell users write.

A ``{{ ... }}`` action written in Go's syntax (``{{.device_1}}``, ``{{ index .Hardware.Disks 0 }}``,
``{{ formatPartition ( index .Hardware.Disks 0 ) 1 }}``, pipelines such as ``{{ .x | lower }}``)
is translated into the equivalent Jinja2 expression first; everything else is Jinja2 as
written. An undefined name is an error, as with Go's ``missingkey=error``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinkops.errors import RenderError

# Tinkerbell caps rendered output at 256 KiB; a render also stops after this many seconds.
MAX_OUTPUT_BYTES = 256 * 1024
MAX_RENDER_SECONDS = 2.0

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
_GO_TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<number>-?[0-9]+(?:\.[0-9]+)?)'
    r"|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<punct>[()|]))"
)


def format_partition(device: str, number: int | str) -> str:
    """Return the partition ``number`` of ``device``, following Tinkerbell's current rules.

    ``/dev/disk/...`` paths get ``-part<n>``; a name ending in a digit (nvme0n1, mmcblk0)
    gets ``p<n>``; anything else (sda, vda) gets ``<n>``.
    """
    if device.startswith("/dev/disk/"):
        return f"{device}-part{number}"
    if device[-1:].isdigit():
        return f"{device}p{number}"
    return f"{device}{number}"


def _index(collection: Any, *keys: Any) -> Any:
    value = collection
    for key in keys:
        try:
            value = value[int(key) if isinstance(value, list | tuple) else key]
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise RenderError(f"index {key!r} is out of range or missing") from error
    return value


def _netmask_to_prefix(netmask: str) -> int:
    return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen


def _printf(fmt: str, *args: Any) -> str:
    # Go's verbs %s, %d and %v map onto Python's; %v has no Python twin.
    return fmt.replace("%v", "%s") % args


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")


def _from_yaml(text: str) -> Any:
    return yaml.safe_load(text)


FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "formatPartition": format_partition,
    "index": _index,
    "netmaskToPrefixLength": _netmask_to_prefix,
    "printf": _printf,
    "lower": lambda s: str(s).lower(),
    "upper": lambda s: str(s).upper(),
    "trim": lambda s: str(s).strip(),
    "quote": lambda *s: " ".join('"' + str(x).replace('"', '\\"') + '"' for x in s),
    "squote": lambda *s: " ".join("'" + str(x) + "'" for x in s),
    "default": lambda fallback, value=None: value if value not in (None, "", [], {}) else fallback,
    "replace": lambda old, new, s: str(s).replace(old, new),
    "contains": lambda needle, s: needle in str(s),
    "hasPrefix": lambda prefix, s: str(s).startswith(prefix),
    "hasSuffix": lambda suffix, s: str(s).endswith(suffix),
    "join": lambda sep, items: sep.join(str(i) for i in items),
    "split": lambda sep, s: str(s).split(sep),
    "b64enc": lambda s: base64.b64encode(str(s).encode()).decode(),
    "b64dec": lambda s: base64.b64decode(str(s)).decode(),
    "toYaml": _to_yaml,
    "fromYaml": _from_yaml,
    "len": len,
}


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    env.globals.update(FUNCTIONS)
    return env


_ENV = _environment()


def translate_go(text: str) -> str:
    """Return ``text`` with every Go-syntax ``{{ }}`` action rewritten as Jinja2."""

    def replace(match: re.Match[str]) -> str:
        left, body, right = match.groups()
        if not _looks_like_go(body):
            return match.group(0)
        expression = _GoParser(body).parse()
        return "{{" + left + " " + expression + " " + right + "}}"

    return _ACTION.sub(replace, text)


def _looks_like_go(body: str) -> bool:
    stripped = body.strip()
    if stripped.startswith("."):
        return True
    first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", stripped)
    if first and first.group(0) in FUNCTIONS:
        rest = stripped[first.end() :]
        if rest[:1].isspace() and not rest.lstrip().startswith(("(", "|", "=", "+", "~")):
            return True
    return bool(re.search(r"(^|[\s(|])\.[A-Za-z_]", stripped))


class _GoParser:
    """A recursive-descent parser for Go template pipelines, producing Jinja2 expressions."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(body):
            if body[position:].strip() == "":
                break
            match = _GO_TOKEN.match(body, position)
            if not match or match.end() == position:
                raise RenderError(
                    f"cannot read {body.strip()!r} as a Go template action near "
                    f"{body[position:].strip()[:20]!r}"
                )
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.position = 0

    def parse(self) -> str:
        expression = self._pipeline()
        if self.position != len(self.tokens):
            raise RenderError(
                f"unexpected {self.tokens[self.position][1]!r} in {self.body.strip()!r}"
            )
        return expression

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _pipeline(self) -> str:
        expression = self._command(None)
        while self._peek() == ("punct", "|"):
            self.position += 1
            expression = self._command(expression)
        return expression

    def _command(self, piped: str | None) -> str:
        operands: list[tuple[str, str]] = []
        while (token := self._peek()) is not None and token not in (
            ("punct", "|"),
            ("punct", ")"),
        ):
            if token == ("punct", "("):
                self.position += 1
                inner = self._pipeline()
                if self._peek() != ("punct", ")"):
                    raise RenderError(f"missing ')' in {self.body.strip()!r}")
                self.position += 1
                operands.append(("expr", f"({inner})"))
            else:
                self.position += 1
                operands.append(token)
        if not operands:
            raise RenderError(f"empty command in {self.body.strip()!r}")
        head_kind, head = operands[0]
        arguments = [self._operand(kind, value) for kind, value in operands[1:]]
        if piped is not None:
            arguments.append(piped)
        if head_kind == "ident" and head in FUNCTIONS:
            return f"{head}({', '.join(arguments)})"
        if arguments:
            raise RenderError(f"{head!r} is not a known function in {self.body.strip()!r}")
        return self._operand(head_kind, head)

    @staticmethod
    def _operand(kind: str, value: str) -> str:
        if kind == "field":
            if value == ".":
                raise RenderError("'.' (the whole context) cannot be used; name a field")
            return value[1:]
        if kind == "string" and value.startswith("`"):
            return repr(value[1:-1])
        return value


def render(text: str, context: Mapping[str, Any]) -> str:
    """Render template ``text`` with ``context``; raise RenderError with the reason."""
    try:
        template = _ENV.from_string(translate_go(text))
    except jinja2.TemplateSyntaxError as error:
        raise RenderError(f"line {error.lineno}: template syntax: {error.message}") from error
    deadline = time.monotonic() + MAX_RENDER_SECONDS
    size = 0
    parts: list[str] = []
    try:
        for chunk in template.generate(**context):
            size += len(chunk.encode())
            if size > MAX_OUTPUT_BYTES:
                raise RenderError(f"rendered output exceeds {MAX_OUTPUT_BYTES} bytes")
            if time.monotonic() > deadline:
                raise RenderError(f"rendering took longer than {MAX_RENDER_SECONDS} s")
            parts.append(chunk)
    except jinja2.UndefinedError as error:
        raise RenderError(
            f"{error.message}; define it in the request's hardware_map or values"
        ) from error
    except jinja2.TemplateError as error:
        raise RenderError(f"template error: {error}") from error
    except RenderError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as error:
        raise RenderError(f"template error: {error}") from error
    return "".join(parts)
