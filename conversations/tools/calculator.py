"""`calculator`: arithmetic the model should not do in its head.

Parsed with `ast`, never `eval`: only numbers, + - * / ** and parentheses
pass; anything else (names, calls, attributes, text, comparisons) is refused
before anything is computed. Decimal arithmetic, so that 0.1 + 0.2 is 0.3.
Bounded: the expression's length and size, exponents, and every intermediate
result (Decimal's context traps an overflow instead of building a huge
number)."""

from __future__ import annotations

import ast
import decimal
import operator
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from .base import Tool, ToolContext, ToolError

MAX_CHARS = 200
MAX_NODES = 150  # numbers and operations: "1 + 2" is 3
MAX_EXPONENT = 1000  # |y| in x ** y
DIGITS = 50  # significant digits while computing
SHOWN_DIGITS = 30  # of a result that is not a whole number
# Each calculation runs in a copy (decimal.localcontext): a context's flags
# are shared state and tools run on worker threads.
ARITHMETIC = decimal.Context(
    prec=DIGITS,
    Emax=9999,
    Emin=-9999,
    traps=[decimal.Overflow, decimal.DivisionByZero, decimal.InvalidOperation],
)

OPERATORS: dict[type[ast.operator], Callable[[Decimal, Decimal], Decimal]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
REFUSED: dict[type[ast.AST], str] = {
    ast.Name: "names are",
    ast.Call: "function calls are",
    ast.Attribute: "attribute access is",
    ast.Subscript: "indexing is",
    ast.Compare: "comparisons are",
    ast.BoolOp: "and/or are",
    ast.Lambda: "lambdas are",
    ast.IfExp: "if/else is",
    ast.JoinedStr: "text is",
}
OPERATOR_SYMBOLS: dict[type[ast.AST], str] = {
    ast.BitXor: "^ (for powers use **)",
    ast.Mod: "%",
    ast.FloorDiv: "//",
}
ALLOWED = "only numbers, + - * / ** and parentheses are allowed"


def calculate(expression: str) -> Decimal:
    """The value of an arithmetic expression, or ToolError saying why not."""
    if len(expression) > MAX_CHARS:
        raise ToolError(f"the expression is too long (at most {MAX_CHARS} characters)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"not a valid arithmetic expression ({ALLOWED})") from None
    if sum(isinstance(node, ast.expr) for node in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"the expression is too complex (more than {MAX_NODES} parts)")
    try:
        with decimal.localcontext(ARITHMETIC):
            return _value(tree.body, expression.strip())
    except decimal.Overflow:
        raise ToolError("the result is too large") from None
    except decimal.DivisionByZero:
        raise ToolError("division by zero") from None
    except decimal.InvalidOperation:
        raise ToolError("the result is not a real number") from None


def shown(value: Decimal) -> str:
    """A plain number: whole numbers as integers, others without noise."""
    if value.is_zero():
        return "0"
    if value == value.to_integral_value() and value.adjusted() < DIGITS:
        return f"{value.quantize(Decimal(1), context=decimal.Context(prec=DIGITS)):f}"
    rounding = decimal.Context(prec=SHOWN_DIGITS)
    value = rounding.plus(value).normalize(rounding)
    return f"{value:f}" if -7 <= value.adjusted() < SHOWN_DIGITS else str(value)


def _value(node: ast.AST, source: str) -> Decimal:
    if isinstance(node, ast.Constant):
        return _number(node, source)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _value(node.operand, source)
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_value(node.left, source), _value(node.right, source))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _value(node.left, source), _value(node.right, source)
        if isinstance(node.op, ast.Div) and right.is_zero():
            raise decimal.DivisionByZero  # 0/0 would be "not a real number"
        return OPERATORS[type(node.op)](left, right)
    raise ToolError(f"{_refused(node)} not allowed: {ALLOWED}")


def _number(node: ast.Constant, source: str) -> Decimal:
    value = node.value
    if isinstance(value, str | bytes):
        raise ToolError(f"text is not allowed: {ALLOWED}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolError(f"{value!r} is not allowed: {ALLOWED}")
    if isinstance(value, int):
        return +Decimal(value)
    # From the digits as written: the float 0.1 is 0.1000000000000000055...
    written = ast.get_source_segment(source, node) or repr(value)
    try:
        return +Decimal(written)
    except decimal.InvalidOperation:
        return +Decimal(repr(value))


def _power(base: Decimal, exponent: Decimal) -> Decimal:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"the exponent is too large (at most {MAX_EXPONENT} either way)")
    if base.is_zero() and exponent.is_zero():
        return Decimal(1)  # as Python and most calculators have it
    if base.is_zero() and exponent < 0:
        raise decimal.DivisionByZero  # Decimal answers Infinity, unsignalled
    return base**exponent


def _refused(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"the operator {OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)} is"
    return next((what for kind, what in REFUSED.items() if isinstance(node, kind)), "this is")


def _run(context: ToolContext, arguments: dict[str, Any]) -> str:
    return shown(calculate(arguments["expression"]))


TOOL = Tool(
    name="calculator",
    description=(
        "Evaluate an arithmetic expression exactly (decimal arithmetic). Supports numbers with "
        "decimals, + - * / ** (power) and parentheses; nothing else. Use it for any calculation "
        "instead of computing in your head. Example: (1.5 + 2) * 3 ** 2"
    ),
    parameters={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "The arithmetic expression, e.g. (1.5 + 2) * 3 ** 2",
                "minLength": 1,
                "maxLength": MAX_CHARS,
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
    function=_run,
    timeout=2.0,
)
