"""Translating the Go ``text/template`` syntax of Tinkerbell's templates into Jinja2.

Tinkerbell renders templates with Go's ``text/template``; tinkops renders them with Jinja2.
Each ``{{ ... }}`` action written in Go's syntax is rewritten as the equivalent Jinja2 tag
before rendering, and everything else is left as written, so one file may mix both:

- pipelines: ``{{.device_1}}``, ``{{ index .Hardware.Disks 0 }}``,
  ``{{ formatPartition ( index .Hardware.Disks 0 ) 1 }}``, ``{{ .x | lower }}``,
  ``{{ (index .Hardware.Interfaces 0).DHCP.MAC }}``;
- control: ``if`` / ``else if`` / ``else`` / ``end``, ``range`` (with ``$i, $v :=``),
  ``with``, comments ``{{/* ... */}}``;
- variables: ``{{ $x := ... }}``, ``$x``, and ``$`` for the top-level data.

Inside ``range`` and ``with`` the dot is the current element, as in Go. A translated tag
keeps the newlines of the action it replaces, so line numbers stay those of the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from tinkops.errors import RenderError

ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
_TOKEN = re.compile(
    r'(?P<space>\s*)(?:(?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<number>-?[0-9]+(?:\.[0-9]+)?)'
    r"|(?P<variable>\$[A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
    r"|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<declare>:=)|(?P<punct>[()|=,]))"
)
KEYWORDS = ("if", "else", "end", "range", "with")
# Go names that are Jinja2 keywords are called through these globals instead.
RENAMED = {"and": "go_and", "or": "go_or", "not": "go_not"}
LITERALS = {"true": "true", "false": "false", "nil": "none"}


@dataclass
class _Block:
    kind: str
    closer: str
    dot: str
    line: int = 0


@dataclass
class _Translator:
    functions: Collection[str]
    blocks: list[_Block] = field(default_factory=list)
    counter: int = 0
    line: int = 0
    """The source line of the action being translated."""

    @property
    def dot(self) -> str:
        return self.blocks[-1].dot if self.blocks else ""

    def action(self, left: str, body: str, right: str) -> str:
        stripped = body.strip()
        padding = "\n" * body.count("\n")
        if stripped.startswith("/*") and stripped.endswith("*/"):
            if left or right:
                return "{{" + left + ' ""' + padding + " " + right + "}}"
            return "{#" + padding + "#}"
        keyword = stripped.split(None, 1)[0] if stripped else ""
        if keyword in KEYWORDS:
            tag = self._control(keyword, stripped[len(keyword) :].strip())
            return "{%" + left + " " + tag + padding + " " + right + "%}"
        tokens = _tokenize(stripped)
        if len(tokens) >= 2 and tokens[0][0] == "variable" and tokens[1][1] in (":=", "="):
            name = self._variable(tokens[0][1])
            expression = _Parser(tokens[2:], stripped, self).parse()
            return "{%" + left + f" set {name} = {expression}" + padding + " " + right + "%}"
        expression = _Parser(tokens, stripped, self).parse()
        return "{{" + left + " " + expression + padding + " " + right + "}}"

    def _control(self, keyword: str, rest: str) -> str:
        if keyword == "end":
            if not self.blocks:
                raise RenderError("{{ end }} without a matching if, range or with")
            return self.blocks.pop().closer
        if keyword == "else":
            if not self.blocks:
                raise RenderError("{{ else }} without a matching if, range or with")
            if rest.startswith("if "):
                return "elif " + self._expression(rest[3:])
            return "else"
        if keyword == "if":
            self.blocks.append(_Block("if", "endif", self.dot, self.line))
            return "if " + self._expression(rest)
        if keyword == "with":
            self.counter += 1
            name = f"go_dot{self.counter}"
            expression = self._expression(rest)
            self.blocks.append(_Block("with", "endif %}{% endwith", name, self.line))
            return f"with {name} = {expression} %}}{{% if {name}"
        return self._range(rest)

    def _range(self, rest: str) -> str:
        tokens = _tokenize(rest)
        declared = [i for i, token in enumerate(tokens) if token[1] == ":="]
        if declared:
            names = [self._variable(v) for k, v, _ in tokens[: declared[0]] if k == "variable"]
            expression = _Parser(tokens[declared[0] + 1 :], rest, self).parse()
            if len(names) == 2:
                self.blocks.append(_Block("range", "endfor", names[1], self.line))
                return f"for {names[0]}, {names[1]} in go_pairs({expression})"
            if len(names) != 1:
                raise RenderError(f"cannot read range {rest!r}; write range $i, $v := .list")
            self.blocks.append(_Block("range", "endfor", names[0], self.line))
            return f"for {names[0]} in go_items({expression})"
        self.counter += 1
        name = f"go_dot{self.counter}"
        expression = _Parser(tokens, rest, self).parse()
        self.blocks.append(_Block("range", "endfor", name, self.line))
        return f"for {name} in go_items({expression})"

    def _expression(self, text: str) -> str:
        if not text:
            raise RenderError("a condition is missing after if, else if or with")
        return _Parser(_tokenize(text), text, self).parse()

    @staticmethod
    def _variable(text: str) -> str:
        name = text[1:]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RenderError(f"cannot use {text!r} as a variable name")
        return name

    def field(self, text: str) -> str:
        """Return the Jinja2 expression for a Go field chain such as ``.a.b`` or ``.``."""
        if text == ".":
            if not self.dot:
                raise RenderError("'.' (the whole context) cannot be used; name a field")
            return self.dot
        names = text[1:].split(".")
        if self.dot:
            return chain(self.dot, names)
        return chain(names[0], names[1:])

    def variable(self, text: str) -> str:
        name, *names = text[1:].split(".")
        if not name:
            if not names:
                raise RenderError("'$' (the whole context) cannot be used; name a field")
            return chain(names[0], names[1:])
        return chain(name, names)


def chain(base: str, names: list[str]) -> str:
    """Return ``base`` followed by a lookup of each name.

    Subscripts, not attributes: Go reads ``.values.items`` as the map key ``items``, where
    Jinja2's ``values.items`` would find the mapping's ``items`` method first.
    """
    return base + "".join(f"[{name!r}]" for name in names)


Token = tuple[str, str, bool]


def _tokenize(body: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    while position < len(body) and body[position:].strip():
        match = _TOKEN.match(body, position)
        if not match or match.end() == position:
            raise RenderError(
                f"cannot read {body.strip()!r} as a Go template action near "
                f"{body[position:].strip()[:20]!r}"
            )
        kind = next(k for k, v in match.groupdict().items() if v is not None and k != "space")
        tokens.append((kind, match.group(kind), bool(match.group("space"))))
        position = match.end()
    return tokens


class _Parser:
    """A recursive-descent parser for one Go pipeline, producing a Jinja2 expression."""

    def __init__(self, tokens: list[Token], body: str, translator: _Translator) -> None:
        self.tokens = tokens
        self.body = body
        self.translator = translator
        self.position = 0

    def parse(self) -> str:
        expression = self._pipeline()
        if self.position != len(self.tokens):
            raise RenderError(f"unexpected {self.tokens[self.position][1]!r} in {self.body!r}")
        return expression

    def _peek(self) -> Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _pipeline(self) -> str:
        expression = self._command(None)
        while (token := self._peek()) is not None and token[1] == "|":
            self.position += 1
            expression = self._command(expression)
        return expression

    def _command(self, piped: str | None) -> str:
        operands: list[tuple[str, str]] = []
        while (token := self._peek()) is not None and token[1] not in ("|", ")"):
            self.position += 1
            if token[1] == "(":
                operands.append(("expr", self._group()))
            elif token[0] == "field" and operands and not token[2] and operands[-1][0] == "expr":
                # ``(index .x 0).DHCP.MAC``: a field chain on the result of a group.
                operands[-1] = ("expr", chain(operands[-1][1], token[1][1:].split(".")))
            else:
                operands.append((token[0], token[1]))
        if not operands:
            raise RenderError(f"empty command in {self.body!r}")
        head_kind, head = operands[0]
        arguments = [self._operand(kind, value) for kind, value in operands[1:]]
        if piped is not None:
            arguments.append(piped)
        if head_kind == "ident" and head not in LITERALS:
            if head not in self.translator.functions:
                raise RenderError(f"{head!r} is not a known function in {self.body!r}")
            return f"{RENAMED.get(head, head)}({', '.join(arguments)})"
        if arguments:
            raise RenderError(f"{head!r} is not a function in {self.body!r}")
        return self._operand(head_kind, head)

    def _group(self) -> str:
        inner = self._pipeline()
        token = self._peek()
        if token is None or token[1] != ")":
            raise RenderError(f"missing ')' in {self.body!r}")
        self.position += 1
        return f"({inner})"

    def _operand(self, kind: str, value: str) -> str:
        if kind == "field":
            return self.translator.field(value)
        if kind == "variable":
            return self.translator.variable(value)
        if kind == "string" and value.startswith("`"):
            return repr(value[1:-1])
        if kind == "ident":
            if value in LITERALS:
                return LITERALS[value]
            if value in self.translator.functions:
                return f"{RENAMED.get(value, value)}()"
            raise RenderError(f"{value!r} is not a known function in {self.body!r}")
        if kind == "punct":
            raise RenderError(f"unexpected {value!r} in {self.body!r}")
        return value


def is_go(body: str) -> bool:
    """Return whether a ``{{ }}`` body can only be Go syntax (a field, variable or keyword)."""
    stripped = body.strip()
    if stripped.startswith((".", "$", "/*")):
        return True
    if re.search(r"(^|[\s(|])[.$][A-Za-z_]", stripped):
        return True
    first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", stripped)
    if first is None or first.group(0) not in KEYWORDS:
        return False
    rest = stripped[first.end() :]
    return not rest or rest[0].isspace()


def translate(text: str, functions: Collection[str], is_jinja: Callable[[str], bool]) -> str:
    """Return ``text`` with every Go-syntax ``{{ }}`` action rewritten as Jinja2.

    An action with a Go field, variable or keyword is Go. Any other is Jinja2 when
    ``is_jinja`` accepts it, and Go otherwise (``{{ toYaml (dict "a" "1") }}``). An action
    that neither reads is left for Jinja2 to report, unless it starts like a Go call.
    """
    translator = _Translator(functions)

    def replace(match: re.Match[str]) -> str:
        left, body, right = match.groups()
        certain = is_go(body)
        if not certain and is_jinja(body):
            return match.group(0)
        translator.line = text.count("\n", 0, match.start()) + 1
        try:
            return translator.action(left, body, right)
        except RenderError as error:
            if not certain and not re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*\s+\S", body):
                return match.group(0)
            error.line = error.line or translator.line
            raise

    result = ACTION.sub(replace, text)
    if translator.blocks:
        block = translator.blocks[-1]
        raise RenderError(f"{{{{ {block.kind} }}}} is never closed; add {{{{ end }}}}", block.line)
    return result
