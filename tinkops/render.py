"""Rendering templates: Jinja2 in a sandbox, plus the Go-template forms Tinkerbell users write.

A ``{{ ... }}`` action written in Go's syntax is translated into Jinja2 first
(tinkops/gotemplate.py); everything else is Jinja2 as written. The functions templates may
call are listed in tinkops/template_functions.py. An undefined name is an error, as with
Go's ``missingkey=error``.

A render is bounded: its output is capped at 256 KiB, it stops after a time limit even
inside a loop that prints nothing, and ``*`` and ``**`` cannot build huge values.

``render_placeholders`` renders a template without a request: every name resolves to a
stand-in value, so the template's own mistakes can be found before any request uses it.
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FrameType, TracebackType
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinkops.errors import RenderError
from tinkops.gotemplate import RENAMED, translate
from tinkops.template_functions import FUNCTIONS, MAX_OUTPUT_BYTES, format_partition

__all__ = [
    "FUNCTIONS",
    "MAX_OUTPUT_BYTES",
    "MAX_RENDER_SECONDS",
    "format_partition",
    "render",
    "render_placeholders",
    "translate_go",
]

MAX_RENDER_SECONDS = 2.0
# The largest string or list that ``*`` may build, and the largest exponent of ``**``.
MAX_REPEAT_ITEMS = MAX_OUTPUT_BYTES
MAX_EXPONENT = 1000
_TEMPLATE_FILE = "<template>"


class Namespace(dict[str, Any]):
    """A mapping of the render context that carries its own path, for clear undefined errors."""

    __slots__ = ("path",)

    def __init__(self, path: str, items: Mapping[str, Any]) -> None:
        super().__init__(items)
        self.path = path


class _Undefined(jinja2.StrictUndefined):
    @property
    def _undefined_message(self) -> str:
        owner = self._undefined_obj
        if isinstance(owner, Namespace) and isinstance(self._undefined_name, str):
            return f"'{owner.path}.{self._undefined_name}' is undefined"
        return str(super()._undefined_message)


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise RenderError(f"exponent {right} is over the limit of {MAX_EXPONENT}")
            return left**right
        for sequence, count in ((left, right), (right, left)):
            repeated = isinstance(sequence, str | list | tuple) and isinstance(count, int)
            if repeated and len(sequence) * count > MAX_REPEAT_ITEMS:
                raise RenderError(
                    f"repeating a value {count} times would exceed {MAX_REPEAT_ITEMS} items"
                )
        return left * right


def _go_items(value: Any) -> list[Any]:
    """Return what Go's ``range`` visits: a list's items, a map's values in key order."""
    if isinstance(value, Mapping):
        return [value[key] for key in sorted(value)]
    if isinstance(value, int):
        return list(range(min(value, 10_000)))
    return list(value) if value else []


def _go_pairs(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return [(key, value[key]) for key in sorted(value)]
    return list(enumerate(value)) if value else []


def _globals() -> dict[str, Callable[..., Any]]:
    names: dict[str, Callable[..., Any]] = dict(FUNCTIONS)
    for go_name, jinja_name in RENAMED.items():
        names[jinja_name] = FUNCTIONS[go_name]
    names["go_items"] = _go_items
    names["go_pairs"] = _go_pairs
    return names


def _environment() -> _Environment:
    env = _Environment(undefined=_Undefined, autoescape=False, keep_trailing_newline=True)
    # Jinja's lipsum draws random words; a render must depend on its input alone.
    env.globals.pop("lipsum", None)
    # The tojson filter prints values it cannot encode (a stand-in) as text.
    env.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": str}
    env.globals.update(_globals())
    return env


_ENV = _environment()


def translate_go(text: str) -> str:
    """Return ``text`` with every Go-syntax ``{{ }}`` action rewritten as Jinja2."""
    return translate(text, FUNCTIONS, _is_jinja)


def _is_jinja(body: str) -> bool:
    try:
        _ENV.parse("{{" + body + "}}")
    except jinja2.TemplateSyntaxError:
        return False
    return True


def render(text: str, context: Mapping[str, Any]) -> str:
    """Render template ``text`` with ``context``; raise RenderError with the reason."""
    template = _compile(text)
    variables = {key: _wrap(key, value) for key, value in context.items()}
    return _generate(template, template.new_context(variables))


def render_placeholders(text: str) -> str:
    """Render ``text`` with every name resolving to a stand-in; raise RenderError on failure.

    Stand-ins print as distinct numbers (1001, 1002, ...), which are valid names, image
    path components, timeouts and workers alike. A function given a stand-in returns a new
    stand-in, because its real result depends on a request.

    NOTE: a condition on a stand-in picks one branch, so a mistake only inside the other
    branch is found when a request renders it.
    """
    template = _compile(text)
    context = template.new_context(_PlaceholderScope(), shared=True)  # type: ignore[arg-type]
    return _generate(template, context)


@functools.lru_cache(maxsize=256)
def _compile(text: str) -> jinja2.Template:
    # Cached by text, because a template renders once per request and compiling costs more
    # than rendering.
    try:
        return _ENV.from_string(translate_go(text))
    except RenderError:
        raise
    except jinja2.TemplateSyntaxError as error:
        raise RenderError(f"template syntax: {error.message}", error.lineno) from error


def _wrap(path: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return Namespace(path, {str(k): _wrap(f"{path}.{k}", v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return [_wrap(f"{path}[{index}]", item) for index, item in enumerate(value)]
    return value


def _generate(template: jinja2.Template, context: jinja2.runtime.Context) -> str:
    deadline = time.monotonic() + MAX_RENDER_SECONDS
    size = 0
    parts: list[str] = []
    try:
        with _Deadline(deadline):
            for chunk in template.root_render_func(context):
                size += len(chunk.encode())
                if size > MAX_OUTPUT_BYTES:
                    raise RenderError(f"rendered output exceeds {MAX_OUTPUT_BYTES} bytes")
                parts.append(chunk)
    except RenderError as error:
        if error.line is None:
            error.line = _template_line(template, error.__traceback__)
        raise
    except jinja2.UndefinedError as error:
        line = _template_line(template, error.__traceback__)
        raise RenderError(error.message or "undefined name", line) from error
    except jinja2.TemplateError as error:
        line = _template_line(template, error.__traceback__)
        raise RenderError(f"template error: {error}", line) from error
    except RecursionError as error:
        raise RenderError("macros call each other too deeply", None) from error
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError) as error:
        line = _template_line(template, error.__traceback__)
        raise RenderError(f"template error: {error}", line) from error
    return "".join(parts)


def _template_line(template: jinja2.Template, traceback: TracebackType | None) -> int | None:
    """Return the template line of the innermost template frame of ``traceback``."""
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = template.get_corresponding_lineno(traceback.tb_lineno)
        traceback = traceback.tb_next
    return line


class _Deadline:
    """Stops a render that runs past ``deadline``, even in a loop that prints nothing.

    A trace function is installed for this thread while the render runs, and checks the
    clock on every line of the compiled template's code, so only template frames pay for
    it. NOTE: while a render runs, a debugger's or coverage tool's tracer is paused.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.previous: Any = None

    def __enter__(self) -> None:
        self.previous = sys.gettrace()
        sys.settrace(self._global)

    def __exit__(self, *_exc: object) -> None:
        sys.settrace(self.previous)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._local if frame.f_code.co_filename == _TEMPLATE_FILE else None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            if time.monotonic() > self.deadline:
                raise RenderError(f"rendering took longer than {MAX_RENDER_SECONDS} s")
            _check_sizes(frame.f_locals.values())
        return self._local


def _check_sizes(values: Iterable[Any]) -> None:
    """Raise RenderError when a template variable outgrew the output limit.

    Checked after each line of template code, so a value that doubles on each step
    (``{% set x = x ~ x %}``, a recursive macro, a namespace in a loop) is stopped at
    most one step past the limit.
    """
    for value in values:
        if isinstance(value, jinja2.utils.Namespace):
            _check_sizes(object.__getattribute__(value, "_Namespace__attrs").values())
        elif isinstance(value, str | list | tuple) and len(value) > MAX_OUTPUT_BYTES:
            raise RenderError(f"a value grew to {len(value)} items, over {MAX_OUTPUT_BYTES}")


class Placeholder:
    """A stand-in for a value that only a request provides, printed as a number.

        The stand-ins of one render share ``numbers``, so each prints a number of its own. Its
    attributes start with ``_`` because the sandbox hides those from templates, so every
    other attribute a template reads is a new stand-in.
    """

    def __init__(self, name: str, numbers: Iterator[int]) -> None:
        self._label = name
        self._numbers = numbers
        self._text = str(next(numbers))

    def _derive(self, name: str) -> Placeholder:
        """Return a new stand-in of the same render."""
        return Placeholder(name, self._numbers)

    def __str__(self) -> str:
        return self._text

    def __getattr__(self, name: str) -> Placeholder:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._derive(f"{self._label}.{name}")

    def __getitem__(self, key: object) -> Placeholder:
        return self._derive(f"{self._label}[{key!r}]")

    def __iter__(self) -> Iterator[Placeholder]:
        return iter([self._derive(f"{self._label}[0]")])

    def __len__(self) -> int:
        return 1

    def __int__(self) -> int:
        return int(self._text)

    def __index__(self) -> int:
        return int(self._text)

    def __float__(self) -> float:
        return float(self._text)

    def __eq__(self, other: object) -> bool:
        return other is self or other == self._text

    def __hash__(self) -> int:
        return hash(self._text)

    def _arithmetic(self, other: object) -> Placeholder:
        return self._derive(f"{self._label} (computed)")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _arithmetic
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = _arithmetic

    def __lt__(self, other: object) -> bool:
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RenderError(f"{self._label!r} is not a known function")


def _stand_in(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        placeholder = next((arg for arg in args if isinstance(arg, Placeholder)), None)
        if placeholder is not None:
            return placeholder._derive(f"{name}(...)")
        return function(*args)

    return call


def _placeholder_pairs(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, Placeholder):
        return [(value._derive(f"{value._label} key"), value[0])]
    return _go_pairs(value)


class _PlaceholderScope(Mapping[str, Any]):
    """The render context of ``render_placeholders``: every name is defined."""

    def __init__(self) -> None:
        self.numbers = itertools.count(1001)
        self.functions = {
            name: _stand_in(f, name) for name, f in _ENV.globals.items() if callable(f)
        }
        self.functions["go_pairs"] = _placeholder_pairs

    def __getitem__(self, name: str) -> Any:
        if name in self.functions:
            return self.functions[name]
        return Placeholder(name, self.numbers)

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
