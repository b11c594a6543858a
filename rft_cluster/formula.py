"""A multi grader's `calculate_output`: arithmetic over sub-grader scores, evaluated by simpleeval
(never `eval`) with only numbers, names, `+ - * /`, unary minus and `min`, `max`, `abs`."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterable, Mapping

from simpleeval import FeatureNotAvailable, InvalidExpression, SimpleEval

FUNCTIONS = {"min": min, "max": max, "abs": abs}
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
# simpleeval also knows comparisons, conditionals, attributes, subscripts, f-strings...: none of
# them is needed to combine scores, so they are not available at all.
_NODES = (ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call)


ALLOWED = "allowed: numbers, the sub-graders' names, + - * /, min(), max(), abs()"


class FormulaError(ValueError):
    """The formula is not allowed, or could not be evaluated to a finite number."""


def _number(node: ast.Constant) -> float:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FeatureNotAvailable(f"only numbers may appear as constants, not {value!r}")
    return value


def _refused(tree: ast.expr, source: str) -> str | None:
    """The outermost part of the formula that is not allowed, quoted from its source (simpleeval's
    own refusal would name an operator by its object, `<ast.Pow object at 0x…>`), or None."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.expr):
            continue  # operators and argument lists: judged with the expression they belong to
        op = node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else None
        if isinstance(node, _NODES) and (op is None or type(op) in _OPERATORS):
            continue
        what = f"the operator {type(op).__name__}" if op is not None else type(node).__name__
        return f"`{ast.get_source_segment(source, node) or ast.unparse(node)}`: {what} is not available"
    return None


class Formula:
    def __init__(self, expression: str, names: Iterable[str]):
        self.expression = expression
        self._names = frozenset(names)
        try:
            # mode="eval" admits exactly one expression: no statements, no `a; b`.
            self._tree = ast.parse(expression.strip(), mode="eval").body
        except SyntaxError as e:
            raise FormulaError(f"{expression!r} is not a valid expression: {e.msg}") from None
        if refused := _refused(self._tree, expression.strip()):
            raise FormulaError(f"{expression!r}: {refused} ({ALLOWED})")
        # Evaluating once with placeholder scores rejects unknown names, functions and syntax at
        # load time; a division by zero is only a property of these placeholders.
        try:
            self._evaluate(dict.fromkeys(self._names, 1.0))
        except ZeroDivisionError:
            pass
        except (InvalidExpression, TypeError) as e:
            raise FormulaError(f"{expression!r}: {e} ({ALLOWED})") from None

    def evaluate(self, scores: Mapping[str, float]) -> float:
        """The formula's value for these scores; raises FormulaError if it is not a finite number."""
        try:
            value = self._evaluate(scores)
        except (InvalidExpression, TypeError, ArithmeticError) as e:
            raise FormulaError(f"{self.expression!r}: {type(e).__name__}: {e}") from None
        if not math.isfinite(value):
            raise FormulaError(f"{self.expression!r} evaluated to {value}")
        return value

    def _evaluate(self, scores: Mapping[str, float]) -> float:
        evaluator = SimpleEval(operators=_OPERATORS, functions=FUNCTIONS, names=dict(scores))
        evaluator.nodes = {node: handler for node, handler in evaluator.nodes.items() if node in _NODES}
        evaluator.nodes[ast.Constant] = _number
        value = evaluator.eval(self.expression, previously_parsed=self._tree)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"the result is {type(value).__name__}, not a number")
        return float(value)
