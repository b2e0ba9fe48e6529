"""The import rules between the processes' packages, read from the source.

zkprefork is three processes with different rules, one package each
(README "Development"): the master never imports kazoo and never runs the
application; a worker never touches ZooKeeper; the registrar never forks a
worker nor serves HTTP. The rules are checked over the AST of every module,
deferred imports inside functions included, and through the whole closure
of what each side imports, not by importing a few modules at run time.
"""
import ast
import os
import textwrap

import pytest

import zkprefork

PACKAGE_DIR = os.path.dirname(zkprefork.__file__)
ENTRY_POINTS = {'zkprefork.cli', 'zkprefork.runner', 'zkprefork.demo'}
SIDES = ('master', 'worker', 'registrar', 'discovery')
# What a side may import from another side's package, besides the top level.
ALLOWED = {
    'master': {'zkprefork.worker', 'zkprefork.registrar.protocol'},
    'worker': set(),
    'registrar': set(),
    # A reader validates and connects as the registrar does, with its very
    # functions: the configuration (protocol), kazoo_hosts and the zxid probe
    # (session), credentials and TLS (security).
    'discovery': {'zkprefork.registrar.security', 'zkprefork.registrar.protocol',
                  'zkprefork.registrar.session'},
}
# Third-party packages a side must never have, even through what it imports.
FORBIDDEN = {
    'master': {'kazoo'},
    'worker': {'kazoo'},
    'registrar': {'zope.server'},
    'discovery': {'zope.server'},
}


def module_name(package_dir, path):
    relative = os.path.relpath(path, os.path.dirname(package_dir))[:-len('.py')]
    parts = relative.split(os.sep)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def read_modules(package_dir):
    """{module name: (path, AST)} for every .py file under `package_dir`."""
    modules = {}
    for folder, _, files in os.walk(package_dir):
        for file in sorted(f for f in files if f.endswith('.py')):
            path = os.path.join(folder, file)
            with open(path, encoding='utf-8') as source:
                modules[module_name(package_dir, path)] = (path, ast.parse(source.read(), path))
    return modules


def _is_type_checking(node):
    return isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test)


def imports_of(tree, name, is_package):
    """[(line, imported module)]: every import in `tree`, resolved to
    absolute names; `from a import b` names `a.b` (b may be a module)."""
    found = []
    skipped = {id(inner) for node in ast.walk(tree) if _is_type_checking(node)
               for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = name.split('.')[:len(name.split('.')) - node.level + is_package]
                base = '.'.join(anchor + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f'{base}.{alias.name}') for alias in node.names]
    return found


def side_of(module):
    parts = module.split('.')
    return parts[1] if len(parts) > 1 and parts[1] in SIDES else None


def _is_under(module, prefix):
    return module == prefix or module.startswith(prefix + '.')


def direct_violations(modules):
    """One line per import that breaks a rule between the packages."""
    problems = []
    for name, (path, tree) in modules.items():
        side = side_of(name)
        is_package = path.endswith('__init__.py')
        for line, imported in imports_of(tree, name, is_package):
            if imported not in modules:
                continue
            why = _why_refused(name, side, imported)
            if why:
                problems.append(f'{path}:{line}: {name} imports {imported}: {why}')
        if name == 'zkprefork.registrar' and imports_of(tree, name, True):
            problems.append(f'{path}: zkprefork.registrar imports something: whatever it imports '
                            'reaches the master with registrar.protocol')
    return problems


def _why_refused(name, side, imported):
    target = side_of(imported)
    if imported in ENTRY_POINTS:
        return 'nothing imports an entry point'
    if side is None and target is not None and name not in ENTRY_POINTS:
        return "a shared module imports no process's package"
    # A package's own __init__ comes with any of its modules (and is kept empty).
    if side is not None and target not in (None, side) and not any(
            _is_under(imported, allowed) or _is_under(allowed, imported) for allowed in ALLOWED[side]):
        return f'the {side} may import only the top level, its own package and {sorted(ALLOWED[side])}'
    return None


def closure(modules, start):
    """Every module of the package `start` imports, directly or not, and
    the third-party modules they import: {module: the chain that got there}."""
    chains, todo = {start: [start]}, [start]
    while todo:
        name = todo.pop()
        path, tree = modules[name]
        for _, imported in imports_of(tree, name, path.endswith('__init__.py')):
            if imported in chains:
                continue
            chains[imported] = chains[name] + [imported]
            if imported in modules:
                todo.append(imported)
    return chains


def forbidden_reached(modules):
    """One line per forbidden third-party package a side reaches."""
    problems = []
    for name in sorted(modules):
        side = side_of(name)
        if side is None:
            continue
        for reached, chain in closure(modules, name).items():
            for banned in FORBIDDEN[side]:
                if _is_under(reached, banned):
                    problems.append(f'{modules[name][0]}: the {side} must never import {banned}: '
                                    + ' -> '.join(chain))
                    break
    return sorted(set(problems))


def test_the_packages_import_only_what_their_process_may():
    modules = read_modules(PACKAGE_DIR)
    assert {side_of(name) for name in modules} >= {'master', 'worker', 'registrar'}
    assert direct_violations(modules) == []


def test_no_process_reaches_a_package_it_must_never_import():
    assert forbidden_reached(read_modules(PACKAGE_DIR)) == []


def plant(tmp_path, files):
    package = tmp_path / 'zkprefork'
    for relative, text in {'__init__.py': '', 'settings.py': '', 'cli.py': '',
                           'master/__init__.py': '', 'worker/__init__.py': '',
                           'registrar/__init__.py': '', 'registrar/protocol.py': '',
                           **files}.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(textwrap.dedent(text))
    return read_modules(str(package))


@pytest.mark.parametrize('files, expected', [
    ({'worker/process.py': 'import kazoo.client\n'}, 'the worker must never import kazoo'),
    ({'master/loop.py': 'from zkprefork.registrar import nodes\n', 'registrar/nodes.py': ''},
     'zkprefork.master.loop imports zkprefork.registrar.nodes'),
    ({'master/loop.py': 'from zkprefork.settings import x\n',
      'settings.py': 'def f():\n    from zkprefork.registrar import nodes\n',
      'registrar/nodes.py': 'import kazoo\n'},
     'the master must never import kazoo: zkprefork.master.loop -> zkprefork.settings -> '
     'zkprefork.registrar.nodes -> kazoo'),
    ({'registrar/loop.py': 'from ..worker import process\n', 'worker/process.py': ''},
     'zkprefork.registrar.loop imports zkprefork.worker.process'),
    ({'registrar/loop.py': 'from zope.server import trigger\n'},
     'the registrar must never import zope.server'),
    ({'master/launch.py': 'from zkprefork import cli\n'}, 'nothing imports an entry point'),
    ({'registrar/__init__.py': 'from . import protocol\n'}, 'zkprefork.registrar imports something'),
])
def test_a_planted_violation_is_named_with_its_file_and_import(tmp_path, files, expected):
    modules = plant(tmp_path, files)
    problems = direct_violations(modules) + forbidden_reached(modules)
    assert any(expected in problem for problem in problems), problems
    planted = next(iter(files))
    assert any(os.path.join('zkprefork', planted) in problem for problem in problems), problems


def test_what_a_process_may_import_passes(tmp_path):
    modules = plant(tmp_path, {
        'master/loop.py': 'from zkprefork.worker import process\nfrom zkprefork.registrar import protocol\n',
        'worker/process.py': 'import zope.server\nfrom zkprefork import settings\n',
        'registrar/loop.py': 'import kazoo\nfrom . import protocol\n',
        'cli.py': 'from zkprefork.master import loop\n',
    })
    assert direct_violations(modules) + forbidden_reached(modules) == []


def test_no_registrar_has_the_shape_of_the_link():
    """The master uses either without asking which: the same public names,
    and nothing of its own besides."""
    from zkprefork.master.registrar_link import NoRegistrar, RegistrarLink
    link = {name for name in dir(RegistrarLink) if not name.startswith('_')}
    stand_in = {name for name in dir(NoRegistrar) if not name.startswith('_')}
    assert stand_in - link == set()
    assert {name for name in vars(NoRegistrar) if name.startswith('_') and not name.startswith('__')} == set()
    public_methods = {name for name in link if callable(getattr(RegistrarLink, name))}
    assert public_methods <= stand_in
