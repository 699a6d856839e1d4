"""The layout stays true as the code grows: ccld/ is grouped by stage, a group imports only
the groups below it, and no module of the project imports itself back through others
(the demo and the command-line tools included). Read from the source with ast, so lazy
imports inside functions count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Shared modules at the top of ccld/ (errors, cli, files, processes) are the floor every
# group stands on; diffusion and models are peers, and neither imports the other.
LEVELS = {'shared': 0, 'diffusion': 1, 'models': 1, 'data': 2, 'sample': 3, 'train': 4, 'app': 5}
# The first release's public names, kept as aliases of the modules that now hold them.
ALIASES = {'ccld.unet', 'ccld.schedule', 'ccld.sampling'}


def project_modules():
    """{dotted name: path} of every module of the project's own packages and tools."""
    modules = {}
    for path in ROOT.glob('*.py'):
        modules[path.stem] = path
    for package_root, top in ((ROOT, 'ccld'), (ROOT, 'cloob_training'),
                              (ROOT / 'latent-diffusion', 'ldm')):
        for path in (package_root / top).rglob('*.py'):
            parts = path.relative_to(package_root).with_suffix('').parts
            if parts[-1] == '__init__':
                parts = parts[:-1]
            modules['.'.join(parts)] = path
    return modules


def imports_of(name, path, modules):
    """The project modules that module `name` imports, anywhere in its body."""
    is_package = path.name == '__init__.py'
    package = name if is_package else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` depends on the deepest project module it names.
            while target and target not in modules:
                target = target.rpartition('.')[0]
            if target and target != name:
                found.add(target)
    return found


def group_of(name):
    parts = name.split('.')
    if parts[0] != 'ccld':
        return None
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LEVELS) else 'shared'


def layering_violations(graph):
    """'A imports B' for every import from a group into one at its level or above it, and
    for every library module that imports a command-line tool."""
    tools = {name for name in graph if '.' not in name and name not in ('ccld',)
             and group_of(name) is None and (ROOT / f'{name}.py').is_file()}
    bad = []
    for source, targets in graph.items():
        low = group_of(source)
        if low is None or source in ALIASES:
            continue
        for target in targets:
            high = group_of(target)
            if target in tools:
                bad.append(f'{source} imports the command-line tool {target}')
            elif high is not None and high != low and LEVELS[high] >= LEVELS[low]:
                bad.append(f'{source} ({low}) imports {target} ({high})')
    return bad


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def project_graph():
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_groups_import_only_the_groups_below_them():
    assert layering_violations(project_graph()) == []


def test_no_import_cycle_in_the_project():
    assert find_cycle(project_graph()) is None


def test_every_ccld_module_belongs_to_a_group_or_is_shared():
    shared = {p.stem for p in (ROOT / 'ccld').glob('*.py')} - {'__init__'}
    aliases = {name.rpartition('.')[2] for name in ALIASES}
    assert shared - aliases == {'cli', 'errors', 'files', 'processes'}
    groups = {p.name for p in (ROOT / 'ccld').iterdir() if p.is_dir() and p.name != '__pycache__'}
    assert groups == set(LEVELS) - {'shared'}
    for group in groups:
        doc = ast.get_docstring(ast.parse((ROOT / 'ccld' / group / '__init__.py').read_text()))
        assert doc and len(doc.splitlines()) >= 2, f'ccld/{group} says not what it is'


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {'ccld.models.unet': {'ccld.train.run'}, 'ccld.train.run': {'ccld.models.unet'},
             'ccld.data.images': {'ccld.errors'}, 'ccld.errors': set()}
    assert find_cycle(graph) == ['ccld.models.unet', 'ccld.train.run', 'ccld.models.unet']
    assert layering_violations(graph) == [
        'ccld.models.unet (models) imports ccld.train.run (train)']
    assert layering_violations({'ccld.models.cloob': {'ccld.diffusion.schedule'}}) == [
        'ccld.models.cloob (models) imports ccld.diffusion.schedule (diffusion)']
