"""doc/zope-server-seam.rst is the whole boundary between zkprefork and
zope.server, and true of the zope.server installed.

Found from the code, not from names: every zkprefork class with a
zope.server class among its bases (a "seam class"), every name its body
defines that a zope.server class (or asyncore's, or zc.zservertracelog's,
in its MRO) defines too, the upstream methods it keeps, the inherited
attributes zkprefork reads or writes, and the upstream module globals it
swaps. Each must have its row in the doc, and each row must still be true.

Lifting the zope.server pin is then a checklist: install the new release
and run this file. Every failing row names upstream code that changed:
re-read that change, adapt zkprefork if it must, and update the row (the
failure gives the new digest). doc/zope-server-seam.rst says it at length.
"""
import ast
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import asyncore
from packaging.requirements import Requirement
from zope.server.adjustments import Adjustments
from zope.server.http.httpserverchannel import HTTPServerChannel
from zope.server.http.httptask import HTTPTask
from zope.server.http.wsgihttpserver import WSGIHTTPServer

import zkprefork.worker
from zkprefork.master import listener
from zkprefork.worker import scoreboard, tlsconnection, zopeserver

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / 'doc' / 'zope-server-seam.rst'
WORKER = pathlib.Path(zkprefork.worker.__file__).parent
# The functions of zkprefork.worker that make classes (a class statement in
# a function, or type(name, bases, namespace)), and a call of each.
FACTORIES = {
    'zopeserver.server_class': lambda: zopeserver.server_class(True),
    'tlsconnection.tls_channel_class': lambda: tlsconnection.tls_channel_class(zopeserver.HTTPChannel),
    'scoreboard._record_type': lambda: scoreboard._record_type(1),  # a ctypes record: no seam class
}
# The objects zkprefork code reaches zope.server's through, by the
# expression it names them with (besides `self` in a seam class).
RECEIVERS = {
    'task': HTTPTask,
    'channel': HTTPServerChannel, 'self.channel': HTTPServerChannel, 'task.channel': HTTPServerChannel,
    'server': WSGIHTTPServer, 'self.server': WSGIHTTPServer, 'channel.server': WSGIHTTPServer,
    'self.channel.server': WSGIHTTPServer,
    'adj': Adjustments, 'self.adj': Adjustments, 'channel.adj': Adjustments,
}
GLOBALS = {'the_trigger': 'dualmodechannel.the_trigger', 'socket_map': 'asyncore.socket_map'}
BORDER = re.compile(r'=+( +=+)+')  # a table's: two columns at least (a title's over- and underline has one)


def is_upstream(cls):
    module = cls.__module__
    return module == 'asyncore' or module.startswith(('zope.server.', 'zc.zservertracelog.'))


def is_seam(cls):
    return not is_upstream(cls) and any(b.__module__.startswith('zope.server.') for b in cls.__mro__)


def display(cls):
    """How the doc names an upstream class."""
    if cls.__module__ == 'asyncore':
        return f'asyncore.{cls.__qualname__}'
    if cls.__module__.startswith('zc.zservertracelog.'):
        return f'tracelog.{cls.__qualname__}'
    return cls.__qualname__


def digest(source):
    return hashlib.sha256(textwrap.dedent(source).encode()).hexdigest()[:12]


# -- what the code says --

def worker_modules():
    return [importlib.import_module(f'zkprefork.worker.{info.name}')
            for info in pkgutil.iter_modules([str(WORKER)])]


@functools.cache
def zkprefork_classes():
    """Every class of zkprefork.worker: its modules', the factories', and
    the classes those name in their bodies (channel_class, parser_class...)."""
    found, todo = {}, [value for module in worker_modules() for value in vars(module).values()]
    todo += [factory() for factory in FACTORIES.values()]
    while todo:
        value = todo.pop()
        if inspect.isclass(value) and value.__module__.startswith('zkprefork.') and value not in found:
            found[value] = None
            todo += vars(value).values()
    return list(found)


def seam_classes():
    return [cls for cls in zkprefork_classes() if is_seam(cls)]


def first_defining(classes, name):
    return next((c for c in classes if name in vars(c)), None)


def unwrap(value):
    return getattr(value, '__func__', value)


@functools.cache
def calls_super(function, name):
    return any(isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Call)
               and getattr(node.value.func, 'id', None) == 'super'
               for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function)))))


def describe(cls, name):
    """(kind, upstream class, upstream object) of `name` on `cls`, or None
    when upstream has no part in it (zkprefork's own, asyncore's kept)."""
    defined_in = first_defining(cls.__mro__[:-1], name)
    if defined_in is None:
        return None
    upstream = first_defining([c for c in cls.__mro__ if is_upstream(c)], name)
    value = unwrap(vars(defined_in)[name])
    if not is_upstream(defined_in):
        if upstream is None:
            if inspect.isfunction(value) and is_upstream_function(value):
                owner = getattr(sys.modules[value.__module__], value.__qualname__.split('.')[0])
                return 'borrows', owner, value
            return None
        if inspect.isfunction(value):
            kind = 'extends' if calls_super(value, name) else 'replaces'
        else:
            kind = 'property' if isinstance(value, property) else 'sets'
        return kind, upstream, (upstream, name)
    if inspect.isfunction(value) and defined_in.__module__ != 'asyncore':
        return 'kept', upstream, (upstream, name)
    return None


def is_upstream_function(function):
    return function.__module__ == 'asyncore' or function.__module__.startswith(
        ('zope.server.', 'zc.zservertracelog.'))


@functools.cache
def seam_rows():
    """{(class name, name): (kind, upstream class, what to fingerprint)}: a name a seam class
    defines that upstream defines too, or an upstream method it keeps;
    rows a seam class inherits unchanged from a seam base are its base's
    (a mixin in front of the base makes rows of its own)."""
    rows = {}
    for cls in seam_classes():
        base = next((b for b in cls.__mro__[1:] if is_seam(b)), None)
        for name in {n for c in cls.__mro__[:-1] for n in vars(c) if n == '__init__' or not n.startswith('__')}:
            row = describe(cls, name)
            if row and (name in vars(cls) or base is None or not same_as_base(cls, base, name)):
                rows[cls.__name__, name] = row
    return rows


def same_as_base(cls, base, name):
    """`cls` has `name` as its seam base has it: from the same class, over the same upstream."""
    ours, theirs = describe(cls, name), describe(base, name) or (None, None)
    return ours[:2] == theirs[:2] and first_defining(cls.__mro__, name) is first_defining(base.__mro__, name)


def upstream_source(target):
    """The source of an upstream definition: a function, or (class, name)."""
    if inspect.isfunction(target):
        return inspect.getsource(target)
    cls, name = target
    value = unwrap(vars(cls)[name])
    if inspect.isfunction(value):
        return inspect.getsource(value)
    class_source = textwrap.dedent(inspect.getsource(cls))
    for statement in ast.parse(class_source).body[0].body:
        if name in assigned_names(statement):
            return ast.get_source_segment(class_source, statement)
    raise LookupError(f'{display(cls)}.{name}: no statement of its class body assigns it')


def assigned_names(statement):
    if isinstance(statement, ast.Assign):
        return {t.id for t in statement.targets if isinstance(t, ast.Name)}
    if isinstance(statement, (ast.AnnAssign, ast.AugAssign)) and isinstance(statement.target, ast.Name):
        return {statement.target.id}
    return set()


def sets_attribute(cls, name):
    """`cls`'s source assigns `name`: in its body, or to self.<name>."""
    return name in assigned_by(cls)


@functools.cache
def assigned_by(cls):
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    names = {name for statement in tree.body for name in assigned_names(statement)}
    return names | {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and isinstance(node.ctx, ast.Store) and getattr(node.value, 'id', None) == 'self'}


@functools.cache
def owner_of(cls, name):
    """The first upstream class in `cls`'s MRO that sets the data attribute
    `name`; None for a method, or a name a zkprefork class body overrides
    (a row of its class's table)."""
    defined_in = first_defining(cls.__mro__, name)
    if inspect.isfunction(unwrap(getattr(cls, name, None))) or defined_in and not is_upstream(defined_in):
        return None
    return next((c for c in cls.__mro__ if is_upstream(c) and sets_attribute(c, name)), None)


@functools.cache
def worker_sources():
    """[(module, AST)] of zkprefork.worker."""
    return [(importlib.import_module(f'zkprefork.worker.{path.stem}'),
             ast.parse(path.read_text(encoding='utf-8'), str(path))) for path in sorted(WORKER.glob('*.py'))]


def attribute_uses():
    """{(owner, attribute): {'reads', 'writes'}}: the upstream attributes
    zkprefork code reaches, through `self` in a seam class or a RECEIVERS
    expression, or on a seam class by its name."""
    uses = {}
    for module, tree in worker_sources():
        for cls, node in _attributes_with_class(module, tree):
            receiver = ast.unparse(node.value)
            target = cls if receiver == 'self' else RECEIVERS.get(receiver, getattr(module, receiver, None))
            target = seam_class_of(target) or target
            if not (inspect.isclass(target) and (is_seam(target) or is_upstream(target))):
                continue
            owner = owner_of(target, node.attr)
            if owner is not None:
                modes = uses.setdefault((display(owner), node.attr), set())
                modes.add('writes' if isinstance(node.ctx, ast.Store) else 'reads')
    return uses


def seam_class_of(base):
    """The seam class built on the upstream class `base` (the first of its kind, not a variant)."""
    return next((c for c in seam_classes() if inspect.isclass(base) and issubclass(c, base)
                 and not any(is_seam(b) for b in c.__mro__[1:])), None)


def seam_class_using(cls):
    """`cls` if it is a seam class; for a mixin of seam classes, the first seam class made with it."""
    return next((c for c in seam_classes() if inspect.isclass(cls) and cls in c.__mro__), None)


def _attributes_with_class(module, tree):
    """(the seam class whose method it is in, or None; node) for every attribute node."""
    def visit(node, cls):
        for child in ast.iter_child_nodes(node):
            inner = cls
            if isinstance(child, ast.ClassDef):
                inner = seam_class_using(getattr(module, child.name, None) if node is tree else None)
            if isinstance(child, ast.Attribute):
                yield cls, child
            if isinstance(child, ast.AugAssign) and isinstance(child.target, ast.Attribute):
                yield cls, ast.Attribute(child.target.value, child.target.attr, ast.Load())
            yield from visit(child, inner)
    yield from visit(tree, None)


def class_makers():
    """{'module.function'}: the functions of zkprefork.worker with a class
    statement in them, or a call of type(name, bases, namespace)."""
    makers = set()
    for module, tree in worker_sources():
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            if any(isinstance(n, ast.ClassDef) or isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'type'
                   and len(n.args) == 3 for n in ast.walk(function)):
                makers.add(f'{module.__name__.rpartition(".")[2]}.{function.name}')
    return makers


def swapped_globals():
    """{'module.global': 'zkprefork module.function'}: every assignment to
    an attribute of an upstream module or class that zkprefork imported."""
    swaps = {}
    for module, tree in worker_sources():
        short = module.__name__.rpartition('.')[2]
        for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for node in ast.walk(scope):  # the innermost function comes last, and wins
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name)
                        and _is_upstream_name(getattr(module, node.value.id, None))):
                    swaps[ast.unparse(node)] = f'{short}.{getattr(scope, "name", "<module>")}'
    return swaps


def _is_upstream_name(value):
    if inspect.ismodule(value):
        name = value.__name__
    elif inspect.isclass(value):
        name = value.__module__
    else:
        return False
    return name == 'asyncore' or name.startswith(('zope.server', 'zc.zservertracelog'))


def global_readers():
    """{(reader, global)}: every function of zope.server (its tests aside)
    and of asyncore that reads a swapped global, and every import of one."""
    import zope.server
    package = pathlib.Path(zope.server.__file__).parent
    files = [(f'zope.server.{".".join(p.relative_to(package).with_suffix("").parts)}', p)
             for p in sorted(package.rglob('*.py')) if 'tests' not in p.parts]
    files.append(('asyncore', pathlib.Path(asyncore.__file__)))
    readers = set()
    for name, path in files:
        readers |= _readers_in(name.removeprefix('zope.server.'), ast.parse(path.read_text(encoding='utf-8')))
    return readers


def _readers_in(module, tree):
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            found |= {(f'{module} (import)', GLOBALS[a.name]) for a in node.names if a.name in GLOBALS}

    def visit(node, path):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                if isinstance(child, ast.FunctionDef):
                    names = {getattr(n, 'id', getattr(n, 'attr', None)) for n in ast.walk(child)}
                    found.update((f'{module}.{".".join(path + [child.name])}', GLOBALS[g])
                                 for g in GLOBALS if g in names)
                visit(child, path + [child.name])
    visit(tree, [])
    return found


# -- what the doc says --

def doc_tables():
    """[(header cells, [row cells])] of the doc's simple tables; a line
    whose first column is blank continues the row above."""
    lines = DOC.read_text(encoding='utf-8').splitlines()
    tables, i = [], 0
    while i + 2 < len(lines):
        if BORDER.fullmatch(lines[i]) and BORDER.fullmatch(lines[i + 2]):
            starts = [m.start() for m in re.finditer(r'=+', lines[i])]
            cut = lambda line: [line[a:b].strip().strip('`') for a, b in zip(starts, starts[1:] + [None])]  # noqa
            header, rows, i = cut(lines[i + 1]), [], i + 3
            while not BORDER.fullmatch(lines[i]):
                cells = cut(lines[i])
                if cells[0] or not rows:
                    rows += [cells] if any(cells) else []
                else:
                    rows[-1] = [' '.join(filter(None, pair)) for pair in zip(rows[-1], cells)]
                i += 1
            tables.append((header, rows))
        i += 1
    return tables


def doc_rows(first_header):
    """{first cell: row} of the tables whose header starts with `first_header`
    (None: the class tables, whose header starts with the class name)."""
    special = {'attribute', 'global', 'reader'}
    found = {}
    for header, rows in doc_tables():
        if header[0] == first_header or (first_header is None and header[0] not in special):
            for row in rows:
                found[(header[0], row[0]) if first_header is None else row[0]] = row
    return found


def assert_same(what, code, doc):
    """The doc's {row: column} is the code's: every difference named."""
    missing, gone = sorted(set(code) - set(doc)), sorted(set(doc) - set(code))
    wrong = sorted(f'{k}: the doc says {doc[k]!r}, the code {v!r}'
                   for k, v in code.items() if k in doc and doc[k] != v)
    problems = {'rows to add': missing, 'rows of what is gone': gone, 'rows to correct': wrong}
    assert not (missing or gone or wrong), '; '.join(
        f'{what} {name}: {rows}' for name, rows in problems.items() if rows)


# -- the tests --

def test_every_class_of_the_worker_is_inspected():
    """A class made by a function the tests do not call would escape the seam: add it to FACTORIES."""
    makers, listed = class_makers(), set(FACTORIES)
    assert makers == listed, (f'class-making functions not in FACTORIES: {sorted(makers - listed)}; '
                              f'FACTORIES that make no class: {sorted(listed - makers)}')


def test_the_doc_has_a_row_for_every_override_and_kept_method_and_no_other():
    code = {f'{c}.{n}': f'{kind}, {display(upstream)}' for (c, n), (kind, upstream, _) in seam_rows().items()}
    doc = {f'{c}.{n}': f'{row[2]}, {row[1]}' for (c, n), row in doc_rows(None).items()}
    assert_same('class table', code, doc)


def test_upstream_code_of_every_row_is_the_code_the_doc_was_written_for():
    rows, doc = seam_rows(), doc_rows(None)
    changed = [f'{c}.{n}: {display(up)}\'s {n} changed (digest {digest(upstream_source(target))}, '
               f'the doc has {doc[c, n][3]}): re-read the upstream change, adapt zkprefork, update the row'
               for (c, n), (_, up, target) in sorted(rows.items())
               if (c, n) in doc and digest(upstream_source(target)) != doc[c, n][3]]
    assert not changed, '\n'.join(changed)


def test_the_doc_lists_every_inherited_attribute_zkprefork_touches():
    code = {f'{owner}.{name}': ', '.join(sorted(modes)) for (owner, name), modes in attribute_uses().items()}
    doc = {key: row[2] for key, row in doc_rows('attribute').items()}
    assert_same('attribute', code, doc)


def test_upstream_still_sets_every_listed_attribute():
    classes = {display(c): c for cls in seam_classes() for c in cls.__mro__ if is_upstream(c)}
    classes['Adjustments'] = Adjustments
    for key in doc_rows('attribute'):
        owner, _, name = key.rpartition('.')
        assert owner in classes and sets_attribute(classes[owner], name), (
            f'{key}: upstream no longer sets it: find what replaced it, adapt zkprefork, update the row')


def test_the_doc_lists_every_swapped_module_global():
    assert_same('global', swapped_globals(), {key: row[1] for key, row in doc_rows('global').items()})


def test_upstream_reads_each_swapped_global_where_the_doc_says():
    """A new reader must read the global at call time, not bind it at import."""
    assert_same('reader', dict(global_readers()), {key: row[1] for key, row in doc_rows('reader').items()})


def test_installed_zope_server_is_within_the_pin():
    setup = (ROOT / 'setup.py').read_text(encoding='utf-8')
    pins = [Requirement(s) for s in re.findall(r"'(zope\.server\b[^']*)'", setup)]
    assert len(pins) == 1 and pins[0].specifier, f'one pinned zope.server requirement in setup.py: {pins}'
    version = importlib.metadata.version('zope.server')
    assert pins[0].specifier.contains(version), f'zope.server {version} is outside the pin {pins[0].specifier}'


# -- what the seam keeps of the master's socket ------------------------------------------

def listen_backlog(port):
    """The backlog of the socket listening on 127.0.0.1:`port`, as the
    kernel holds it (ss: Send-Q of a listening socket)."""
    out = subprocess.run(['ss', '-ltnH', f'sport = :{port}'], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == 'LISTEN' and out[3] == f'127.0.0.1:{port}', out
    return int(out[2])


def test_workers_keep_the_masters_listen_backlog(servers, ini):
    somaxconn = int(pathlib.Path('/proc/sys/net/core/somaxconn').read_text())
    # The kernel caps a backlog at somaxconn: below zope's 1024, both look alike.
    assert somaxconn > Adjustments.backlog, f'somaxconn {somaxconn}: this test cannot tell'
    server = servers(ini('host = 127.0.0.1\nworkers = 2\n')).wait_serving()
    assert len(server.worker_pids()) == 2
    assert listen_backlog(server.port) == min(listener.BACKLOG, somaxconn)
