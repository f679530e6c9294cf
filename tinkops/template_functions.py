"""The functions templates may call: a hermetic subset of Sprig, plus Tinkerbell's own.

Every function is pure: none reads the environment, the clock, the network, files or a
random source, so a request renders to the same workflow wherever and whenever it is
rendered. Argument order follows Sprig, whose functions take the piped value last
(``{{ .x | replace "a" "b" }}`` is ``replace "a" "b" .x``). Functions that build strings or
lists check the size of what they build, so one call cannot allocate without bound.

Regular-expression functions are left out on purpose: Python's ``re`` can backtrack for
minutes on a crafted pattern, and one call cannot be interrupted.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml

from tinkops.errors import Problem, RenderError
from tinkops.yamltext import load

# Tinkerbell caps rendered output at 256 KiB; no single value may be larger either.
MAX_OUTPUT_BYTES = 256 * 1024
MAX_LIST_ITEMS = 10_000


def format_partition(device: Any, number: Any) -> str:
    """Return the partition ``number`` of ``device``, following Tinkerbell's current rules.

    ``/dev/disk/...`` paths get ``-part<n>``; a name ending in a digit (nvme0n1, mmcblk0)
    gets ``p<n>``; anything else (sda, vda) gets ``<n>``.
    """
    device = str(device)
    if device.startswith("/dev/disk/"):
        return f"{device}-part{number}"
    if device[-1:].isdigit():
        return f"{device}p{number}"
    return f"{device}{number}"


def netmask_to_prefix_length(netmask: Any) -> int:
    """Return the prefix length of a dotted IPv4 netmask (255.255.255.0 is 24)."""
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError as error:
        raise RenderError(f"netmaskToPrefixLength: {netmask!r} is not a netmask") from error


def _checked_text(text: str, function: str) -> str:
    if len(text) > MAX_OUTPUT_BYTES:
        raise RenderError(f"{function} would build {len(text)} characters, over the limit")
    return text


def _checked_list(items: list[Any], function: str) -> list[Any]:
    if len(items) > MAX_LIST_ITEMS:
        raise RenderError(f"{function} would build {len(items)} items, over {MAX_LIST_ITEMS}")
    return items


def _index(collection: Any, *keys: Any) -> Any:
    value = collection
    for key in keys:
        try:
            value = value[int(key) if isinstance(value, list | tuple) else key]
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise RenderError(f"index {key!r} is out of range or missing") from error
    return value


def _printf(fmt: str, *args: Any) -> str:
    # Go's verbs %s, %d and %v map onto Python's; %v has no Python twin.
    try:
        return _checked_text(str(fmt).replace("%v", "%s") % args, "printf")
    except (TypeError, ValueError) as error:
        raise RenderError(f"printf {fmt!r}: {error}") from error


def _empty(value: Any) -> bool:
    """Return whether ``value`` is Go's zero value, as Sprig's ``empty`` decides."""
    return value is None or value == "" or value == 0 or value is False or value in ([], {})


def _default(fallback: Any, value: Any = None) -> Any:
    return fallback if _empty(value) else value


def _coalesce(*values: Any) -> Any:
    return next((value for value in values if not _empty(value)), None)


def _ternary(when_true: Any, when_false: Any, condition: Any) -> Any:
    return when_true if _truthy(condition) else when_false


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value not in ("", "false", "False", "0")
    return bool(value)


def _to_int(value: Any) -> int:
    try:
        return int(float(str(value).strip()))
    except ValueError:
        return 0


def _to_float(value: Any) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        return 0.0


def _number(value: Any) -> int | float:
    number = _to_float(value)
    return int(number) if number.is_integer() else number


def _check_size(size: int, function: str) -> None:
    """Raise RenderError before building a value of ``size`` characters or items."""
    if size > MAX_OUTPUT_BYTES:
        raise RenderError(f"{function} would build {size} characters, over the limit")


def _repeat(count: Any, text: Any) -> str:
    times = max(_to_int(count), 0)
    _check_size(len(str(text)) * times, "repeat")
    return str(text) * times


def _indent(spaces: Any, text: Any) -> str:
    pad = " " * max(_to_int(spaces), 0)
    return _checked_text("\n".join(pad + line for line in str(text).split("\n")), "indent")


def _nindent(spaces: Any, text: Any) -> str:
    return "\n" + _indent(spaces, text)


def _replace(old: Any, new: Any, text: Any) -> str:
    source, before, after = str(text), str(old), str(new)
    count = source.count(before) if before else len(source) + 1
    _check_size(len(source) + count * (len(after) - len(before)), "replace")
    return source.replace(before, after)


def _join(separator: Any, items: Any) -> str:
    parts = [str(item) for item in _seq_items(items)]
    _check_size(sum(map(len, parts)) + len(str(separator)) * len(parts), "join")
    return str(separator).join(parts)


def _substr(start: Any, end: Any, text: Any) -> str:
    begin, stop = _to_int(start), _to_int(end)
    return str(text)[begin:] if stop < 0 else str(text)[begin:stop]


def _trunc(length: Any, text: Any) -> str:
    count = _to_int(length)
    return str(text)[:count] if count >= 0 else str(text)[count:]


def _list(*items: Any) -> list[Any]:
    return list(items)


def _until(count: Any) -> list[int]:
    number = _to_int(count)
    if number > MAX_LIST_ITEMS:
        raise RenderError(f"until would build {number} items, over {MAX_LIST_ITEMS}")
    return list(range(number))


def _seq_items(value: Any) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise RenderError(f"expected a list, found {value!r}")
    return list(value)


def _uniq(items: Any) -> list[Any]:
    result: list[Any] = []
    for item in _seq_items(items):
        if item not in result:
            result.append(item)
    return result


def _concat(*lists: Any) -> list[Any]:
    result: list[Any] = []
    for items in lists:
        result += _seq_items(items)
    return _checked_list(result, "concat")


def _dict(*pairs: Any) -> dict[str, Any]:
    if len(pairs) % 2:
        raise RenderError("dict needs key and value pairs")
    return {str(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}


def _get(mapping: Any, key: Any) -> Any:
    return mapping.get(str(key), "") if isinstance(mapping, Mapping) else ""


def _has_key(mapping: Any, key: Any) -> bool:
    return isinstance(mapping, Mapping) and str(key) in mapping


def _keys(*mappings: Any) -> list[str]:
    return [str(key) for mapping in mappings for key in mapping]


def _pick(mapping: Any, *keys: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(mapping).items() if k in {str(key) for key in keys}}


def _omit(mapping: Any, *keys: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(mapping).items() if k not in {str(key) for key in keys}}


def _plain(value: Any) -> Any:
    """Return ``value`` with mappings and lists of the render context as plain ones."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _to_yaml(value: Any) -> str:
    try:
        text = yaml.safe_dump(_plain(value), sort_keys=False, default_flow_style=False)
    except yaml.YAMLError as error:
        raise RenderError(f"toYaml: {error}") from error
    return _checked_text(text.rstrip("\n"), "toYaml")


def _from_yaml(text: Any) -> Any:
    # Bounded like every repository file: no alias bombs, scalars as written.
    problems: list[Problem] = []
    document = load("fromYaml", _checked_text(str(text), "fromYaml").encode(), problems)
    if document is None:
        raise RenderError(f"fromYaml: {problems[0].message}")
    return document.value


def _to_json(value: Any) -> str:
    try:
        return _checked_text(json.dumps(_plain(value), separators=(",", ":")), "toJson")
    except (TypeError, ValueError) as error:
        raise RenderError(f"toJson: {error}") from error


def _to_pretty_json(value: Any) -> str:
    try:
        return _checked_text(json.dumps(_plain(value), indent=2), "toPrettyJson")
    except (TypeError, ValueError) as error:
        raise RenderError(f"toPrettyJson: {error}") from error


def _from_json(text: Any) -> Any:
    try:
        return json.loads(_checked_text(str(text), "fromJson"))
    except (ValueError, RecursionError) as error:
        raise RenderError(f"fromJson: {error}") from error


def _b64dec(text: Any) -> str:
    try:
        return base64.b64decode(str(text), validate=True).decode()
    except (ValueError, UnicodeDecodeError) as error:
        raise RenderError(f"b64dec: {error}") from error


def _divide(left: Any, right: Any) -> int | float:
    divisor = _number(right)
    if divisor == 0:
        raise RenderError("div: division by zero")
    dividend = _number(left)
    if isinstance(dividend, int) and isinstance(divisor, int):
        return int(dividend / divisor)
    return dividend / divisor


def _modulo(left: Any, right: Any) -> int:
    divisor = _to_int(right)
    if divisor == 0:
        raise RenderError("mod: division by zero")
    return int(math.fmod(_to_int(left), divisor))


def _and(*values: Any) -> Any:
    result: Any = True
    for value in values:
        result = value
        if not _truthy(value):
            return value
    return result


def _or(*values: Any) -> Any:
    result: Any = False
    for value in values:
        result = value
        if _truthy(value):
            return value
    return result


def _hash(algorithm: str) -> Callable[[Any], str]:
    return lambda text: hashlib.new(algorithm, str(text).encode()).hexdigest()


# The documented set (docs/repository-format.md lists each one). Go's built-ins first,
# then Sprig's hermetic string, list, dict, encoding and math functions, then Tinkerbell's.
FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    # Go text/template built-ins.
    "index": _index,
    "len": len,
    "printf": _printf,
    "print": lambda *items: "".join(str(item) for item in items),
    "println": lambda *items: " ".join(str(item) for item in items) + "\n",
    "eq": lambda left, *rights: any(left == right for right in rights),
    "ne": lambda left, right: left != right,
    "lt": lambda left, right: left < right,
    "le": lambda left, right: left <= right,
    "gt": lambda left, right: left > right,
    "ge": lambda left, right: left >= right,
    "and": _and,
    "or": _or,
    "not": lambda value: not _truthy(value),
    # Strings.
    "lower": lambda s: str(s).lower(),
    "upper": lambda s: str(s).upper(),
    "title": lambda s: str(s).title(),
    "trim": lambda s: str(s).strip(),
    "trimAll": lambda chars, s: str(s).strip(str(chars)),
    "trimPrefix": lambda prefix, s: str(s).removeprefix(str(prefix)),
    "trimSuffix": lambda suffix, s: str(s).removesuffix(str(suffix)),
    "nospace": lambda s: "".join(str(s).split()),
    "repeat": _repeat,
    "substr": _substr,
    "trunc": _trunc,
    "contains": lambda needle, s: str(needle) in str(s),
    "hasPrefix": lambda prefix, s: str(s).startswith(str(prefix)),
    "hasSuffix": lambda suffix, s: str(s).endswith(str(suffix)),
    "replace": _replace,
    "quote": lambda *s: " ".join('"' + str(x).replace('"', '\\"') + '"' for x in s),
    "squote": lambda *s: " ".join("'" + str(x) + "'" for x in s),
    "cat": lambda *s: " ".join(str(x) for x in s if x is not None),
    "indent": _indent,
    "nindent": _nindent,
    "join": _join,
    "split": lambda sep, s: str(s).split(str(sep)),
    "splitList": lambda sep, s: str(s).split(str(sep)),
    "toString": str,
    "toStrings": lambda items: [str(item) for item in _seq_items(items)],
    # Defaults and conditions.
    "default": _default,
    "empty": _empty,
    "coalesce": _coalesce,
    "ternary": _ternary,
    # Lists.
    "list": _list,
    "first": lambda items: (_seq_items(items) or [None])[0],
    "last": lambda items: (_seq_items(items) or [None])[-1],
    "rest": lambda items: _seq_items(items)[1:],
    "initial": lambda items: _seq_items(items)[:-1],
    "append": lambda items, item: _checked_list([*_seq_items(items), item], "append"),
    "prepend": lambda items, item: _checked_list([item, *_seq_items(items)], "prepend"),
    "concat": _concat,
    "reverse": lambda items: _seq_items(items)[::-1],
    "uniq": _uniq,
    "without": lambda items, *drop: [i for i in _seq_items(items) if i not in drop],
    "has": lambda needle, items: needle in _seq_items(items),
    "compact": lambda items: [i for i in _seq_items(items) if not _empty(i)],
    "until": _until,
    # Dicts.
    "dict": _dict,
    "get": _get,
    "hasKey": _has_key,
    "keys": _keys,
    "pick": _pick,
    "omit": _omit,
    # Encodings.
    "b64enc": lambda s: base64.b64encode(str(s).encode()).decode(),
    "b64dec": _b64dec,
    "sha1sum": _hash("sha1"),
    "sha256sum": _hash("sha256"),
    "toJson": _to_json,
    "toPrettyJson": _to_pretty_json,
    "fromJson": _from_json,
    "toYaml": _to_yaml,
    "fromYaml": _from_yaml,
    # Numbers.
    "atoi": _to_int,
    "int": _to_int,
    "int64": _to_int,
    "float64": _to_float,
    "add": lambda *n: sum(_number(x) for x in n),
    "add1": lambda n: _number(n) + 1,
    "sub": lambda a, b: _number(a) - _number(b),
    "mul": lambda *n: math.prod(_number(x) for x in n),
    "div": _divide,
    "mod": _modulo,
    "max": lambda *n: max(_number(x) for x in n),
    "min": lambda *n: min(_number(x) for x in n),
    "floor": lambda n: math.floor(_to_float(n)),
    "ceil": lambda n: math.ceil(_to_float(n)),
    "round": lambda n, places=0: round(_to_float(n), _to_int(places)),
    # Tinkerbell's.
    "formatPartition": format_partition,
    "netmaskToPrefixLength": netmask_to_prefix_length,
}
