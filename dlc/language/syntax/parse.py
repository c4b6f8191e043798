"""Parse .dln text with Lark (LALR, with positions) and turn the tree into the AST."""
from __future__ import annotations

import functools
import sys

import lark
from lark import Lark, Token, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.visitors import Transformer_NonRecursive

from dlc.core.diagnostics import DlcError, ParseError, Source, Span
from dlc.core.userdir import private_file
from dlc.language.syntax import ast


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    """Building the LALR tables takes about 40 ms, loading them 4 ms: Lark keeps them in a
    file in dlc's private cache directory, checked against a digest of the grammar and the
    options (and rebuilt where it differs, is damaged or cannot be written: silently)."""
    tables = private_file(f"dln-parser.lark-{lark.__version__}.py{sys.version_info[0]}{sys.version_info[1]}")
    return Lark.open_from_package("dlc.grammar", "dln.lark", parser="lalr", propagate_positions=True,
                                  maybe_placeholders=True, cache=str(tables) if tables else False)


def parse(text: str, name: str = "<string>") -> ast.Program:
    text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write first
    source = Source(name, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    except RecursionError:  # only pathological nesting gets here; point at the end of the text
        raise ParseError("the program is nested too deeply to parse", source.end()) from None
    try:
        # non-recursive: a long `a + b + c + ...` chain must not exhaust Python's stack
        program = _ToAst(source).transform(tree)
    except VisitError as e:  # a rule raised (e.g. an oversized literal): report that error
        if isinstance(e.orig_exc, DlcError):
            raise e.orig_exc from None
        raise
    if not program.defs and not program.trains:  # empty, or only comments: point at the end
        raise DlcError("this file defines no `model`", source.end(),
                       hint="add `model name(x: f32[B, n]) -> f32[B, k] { ... }`")
    return program


# --- error messages ------------------------------------------------------------------

_TOKEN_WORDS = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
                "$END": "end of file"}
_FOUND_WORDS = {"NAME": "name", "INT": "number", "FLOAT": "number", "STRING": "string"}


@functools.lru_cache(maxsize=None)
def _terminal_text() -> dict[str, str]:
    out = {}
    for t in _parser().terminals:
        if t.name in _TOKEN_WORDS:
            out[t.name] = _TOKEN_WORDS[t.name]
        elif t.pattern.type == "str":
            out[t.name] = f"`{t.pattern.value}`"
    out["$END"] = "end of file"
    return out


def _describe(names) -> str:
    words = sorted({_terminal_text().get(n, n) for n in names})
    if len(words) > 6:
        words = words[:6] + ["…"]
    return ", ".join(words)


def _syntax_error(e: UnexpectedInput, source: Source) -> ParseError:
    line = getattr(e, "line", -1)
    col = getattr(e, "column", -1)
    if line is None or line < 1:  # end of input: point just past the last character
        end = source.end()
        line, col = end.line, end.col
    width = 1
    hint = None
    if isinstance(e, UnexpectedCharacters):
        ch = source.text[e.pos_in_stream] if e.pos_in_stream < len(source.text) else "?"
        message = f"unexpected character `{ch if ch.isprintable() else ascii(ch)[1:-1]}`"
        if ch == "\t":
            message = "unexpected tab character"
        elif ch in "\"'":
            rest = source.text[e.pos_in_stream + 1:].split("\n", 1)[0]
            if ch not in rest:
                message = "unterminated string"
                width = len(rest) + 1
                hint = f"close the string with `{ch}` on the same line"
        hint = hint or _char_hint(ch)
    elif isinstance(e, UnexpectedToken) and e.token.type != "$END":
        tok = e.token
        width = max(1, len(str(tok)))
        message = (f"unexpected {_FOUND_WORDS[tok.type]} `{tok}`" if tok.type in _FOUND_WORDS
                   else f"unexpected {_terminal_text().get(tok.type, tok.type)}")
        message += f"; expected {_describe(e.expected)}"
        hint = _token_hint(tok, set(e.expected))
        # a `(` or `[` left open on an earlier line (an open `{` is just the body we are in)
        opener = _unclosed(source.text, tok.start_pos)
        closer = {"(": "RPAR", "[": "RSQB", "{": None}
        if opener and closer[opener[0]] in e.expected and opener[1] < tok.line \
                and tok.type not in ("COMMA", "RPAR", "RSQB", "RBRACE"):
            hint = f"the `{opener[0]}` at {opener[1]}:{opener[2]} is not closed"
    else:
        expected = getattr(e, "expected", None) or ()
        message = "unexpected end of file" + (f"; expected {_describe(expected)}" if expected else "")
        opener = _unclosed(source.text, len(source.text))
        if opener:
            hint = f"the `{opener[0]}` at {opener[1]}:{opener[2]} is not closed"
        elif "RBRACE" in expected:
            hint = "a `}` is missing"
        elif "RPAR" in expected:
            hint = "a `)` is missing"
    span = Span(source, line, col, line, col + width)
    return ParseError(message, span, hint)


def _unclosed(text: str, end: int) -> tuple[str, int, int] | None:
    """The innermost bracket opened before `end` and not closed by then: (char, line, col)."""
    stack: list[tuple[str, int, int]] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    line, col, i = 1, 1, 0
    quote = None
    while i < end:
        ch = text[i]
        if quote:
            if ch == quote or ch == "\n":
                quote = None
        elif ch == "#":
            while i < end and text[i] != "\n":
                i += 1
            continue
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            stack.append((ch, line, col))
        elif ch in pairs and stack and stack[-1][0] == pairs[ch]:
            stack.pop()
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    return stack[-1] if stack else None


def _char_hint(ch: str) -> str | None:
    if ch == ";":
        return "statements end at the end of the line; no `;` is needed"
    if ch == "=":
        return None
    if ch in "{}":
        return "braces open and close `model`, `block` and `train` bodies only"
    return None


def _token_hint(tok: Token, expected: set[str]) -> str | None:
    if str(tok) in ("<", "<=", ">", ">=", "==", "!="):
        return "comparisons do not chain (`a < b < c`): compare two values at a time"
    if tok.type == "EQUAL":
        return "`=` assigns only at the start of a statement (`name = expr`) or names an argument"
    if "COMMA" in expected and "RPAR" in expected:
        return "separate arguments with `,`"
    if tok.type == "NAME" and "RPAR" not in expected and "RBRACE" in expected:
        return ("each statement is `name = expr`, `a, b = expr`, `param name: type = init`, "
                "`state name: type` or `return expr`")
    if tok.type in ("INT", "FLOAT") and expected <= {"NAME"}:
        return "a name must start with a letter or `_`"
    return None


# --- tree -> AST ------------------------------------------------------------------------

@v_args(meta=True, inline=True)
class _ToAst(Transformer_NonRecursive):
    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span:
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    # definitions
    def start(self, meta, *defs):
        return ast.Program(tuple(d for d in defs if isinstance(d, ast.Def)),
                           tuple(d for d in defs if isinstance(d, ast.Train)))

    def _def(self, kind, meta, name, params, results, body):
        first, more = results
        return ast.Def(kind, str(name), tuple(params or ()), first, tuple(body), self._span(meta),
                       self._tok_span(name), more)

    def one_result(self, meta, type_):
        return type_, ()

    def several_results(self, meta, first, *rest):
        more = []
        for name, type_ in zip(rest[::2], rest[1::2]):
            span = Span(self.source, name.line, name.column, type_.span.end_line, type_.span.end_col)
            more.append(ast.NamedResult(str(name), type_, span))
        return first, tuple(more)

    def model(self, meta, name, params, result, body):
        return self._def("model", meta, name, params, result, body)

    def block(self, meta, name, params, result, body):
        return self._def("block", meta, name, params, result, body)

    def train(self, meta, name, *options):
        return ast.Train(str(name), tuple(options), self._span(meta), self._tok_span(name))

    def params(self, meta, *ps):
        return list(ps)

    def tensor_param(self, meta, name, type_):
        return ast.Param(str(name), type_, None, self._span(meta))

    def default_param(self, meta, name, value):
        return ast.Param(str(name), None, value, self._span(meta))

    def body(self, meta, *stmts):
        return list(stmts)

    def option(self, meta, name, value):
        return ast.Option(str(name), value, self._span(meta))

    # statements
    def assign(self, meta, name, value):
        return ast.Assign(str(name), value, self._span(meta))

    def unpack(self, meta, first, *rest):
        *targets, value = rest
        return ast.Unpack((str(first),) + tuple(_plain(t) for t in targets), value, self._span(meta))

    def target_tuple(self, meta, *targets):
        return tuple(_plain(t) for t in targets)

    def param_decl(self, meta, name, type_, init, *options):
        return ast.ParamDecl(str(name), type_, init, self._span(meta), tuple(options))

    def state_decl(self, meta, name, type_, init):
        return ast.StateDecl(str(name), type_, init, self._span(meta))

    def return_stmt(self, meta, value, *more):
        if more:  # `return a, b`: the values as one tuple
            items = (value,) + more
            value = ast.TupleLit(items, Span(self.source, items[0].span.line, items[0].span.col,
                                             items[-1].span.end_line, items[-1].span.end_col))
        return ast.Return(value, self._span(meta))

    # types
    def type(self, meta, dtype, shape):
        return ast.TypeExpr(str(dtype), tuple(shape) if shape is not None else (), self._span(meta))

    def shape(self, meta, *dims):
        return [d for d in dims if d is not None]

    def int_dim(self, meta, tok):
        return int(tok)

    def sym_dim(self, meta, tok):
        return str(tok)

    # expressions
    def _binop(op):  # noqa: N805 - a factory used only in the class body
        def rule(self, meta, lhs, rhs):
            return ast.BinOp(op, lhs, rhs, self._span(meta))
        return rule

    add = _binop("add")
    sub = _binop("sub")
    mul = _binop("mul")
    div = _binop("div")
    matmul = _binop("matmul")
    pow = _binop("pow")
    lt = _binop("lt")
    le = _binop("le")
    gt = _binop("gt")
    ge = _binop("ge")
    eq = _binop("eq")
    ne = _binop("ne")

    def neg(self, meta, x):
        return ast.Neg(x, self._span(meta))

    def int_lit(self, meta, tok):
        if len(tok) > 300:  # past any float; Python also refuses to convert > 4300 digits
            raise ParseError("integer literal is too large", self._tok_span(tok))
        return ast.Num(int(tok), self._tok_span(tok))

    def float_lit(self, meta, tok):
        return ast.Num(float(tok), self._tok_span(tok))

    def string_lit(self, meta, tok):
        return ast.Str(str(tok)[1:-1], self._tok_span(tok))

    def tuple_lit(self, meta, *items):
        return ast.TupleLit(tuple(items), self._span(meta))

    def list_lit(self, meta, *items):
        return ast.ListLit(tuple(i for i in items if i is not None), self._span(meta))

    def dotted(self, meta, *parts):
        return ast.Name(tuple(str(p) for p in parts), self._span(meta))

    def args(self, meta, *items):
        return list(items)

    def kwarg(self, meta, name, value):
        return ast.Kwarg(str(name), value, self._span(meta))

    def _split(self, items):
        items = items or []
        pos = tuple(a for a in items if not isinstance(a, ast.Kwarg))
        kws = tuple(a for a in items if isinstance(a, ast.Kwarg))
        return pos, kws

    def call(self, meta, func, args):
        pos, kws = self._split(args)
        return ast.Call(func, pos, kws, self._span(meta))

    def pipe_bare(self, meta, lhs, func):
        return ast.Call(func, (lhs,), (), func.span, piped=True)

    def pipe_call(self, meta, lhs, func, args):
        pos, kws = self._split(args)
        # the span of a piped call is the target `f(args)`, not the whole chain
        span = Span(self.source, func.span.line, func.span.col, meta.end_line, meta.end_column)
        return ast.Call(func, (lhs,) + pos, kws, span, piped=True)

    def index(self, meta, value, subs):
        return ast.Index(value, tuple(subs), self._span(meta))

    def subscripts(self, meta, *subs):
        return list(subs)

    def slice(self, meta, start, stop, step):
        return ast.Slice(start, stop, step, self._span(meta))


def _plain(target):
    """An unpacking target with its name tokens as plain strings."""
    return str(target) if isinstance(target, str) else tuple(_plain(t) for t in target)
