"""The code's shape (issue 17): no class over MAX_CLASS_LINES lines and no
function over MAX_FUNCTION_LINES, in every module of the package, found
from its AST (every def, methods and nested ones included; a size is its
def or class line to its last line, docstring included)."""
import ast
import pathlib

import zkprefork

MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 40
PACKAGE = pathlib.Path(zkprefork.__file__).parent


def oversized():
    """['file:line: class|def name, N lines (limit M)'] for every module of the package."""
    found = []
    for path in sorted(PACKAGE.rglob('*.py')):
        tree = ast.parse(path.read_text(encoding='utf-8'), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                kind, limit = 'class', MAX_CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind, limit = 'def', MAX_FUNCTION_LINES
            else:
                continue
            size = node.end_lineno - node.lineno + 1
            if size > limit:
                where = path.relative_to(PACKAGE.parent)
                found.append(f'{where}:{node.lineno}: {kind} {node.name}, {size} lines (limit {limit})')
    return found


def test_no_class_over_250_lines_and_no_function_over_40():
    too_big = oversized()
    assert not too_big, 'too big:\n' + '\n'.join(too_big)
