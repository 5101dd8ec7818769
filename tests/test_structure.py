"""The import structure of fusedecode: every import points down a declared layer order.

The project's modules are the ``.py`` files of ``python/fusedecode`` and of ``triton_kernels``
(installed as ``fusedecode.triton_kernels``). Their imports of one another are read from the source
(``ast``, nothing is imported), at module level and inside functions, and checked against
``LAYERS``:

- no import cycle;
- no upward edge: a module imports only modules of its own layer or of a layer below;
- no import between project modules inside a function (a lazy import hides a circle or an upward
  edge from whoever reads the top of the file), except of a module that needs an optional
  third-party package (``OPTIONAL_PACKAGES``): ``fusedecode.triton_kernels`` needs Triton, the
  Hugging Face layer transformers, ``fusedecode.vllm``'s processor vLLM; fusedecode works without
  them, so those modules are imported only when asked for.

``python tests/test_structure.py`` prints the picture (layers, edges, problems); ``docs/structure.md``
holds it with the reasons for the order.
"""

import ast
import fnmatch
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "fusedecode"
SOURCES = ((ROOT / "python" / PACKAGE, PACKAGE), (ROOT / "triton_kernels", f"{PACKAGE}.triton_kernels"))
# The structure is read from the source tree: where the tests run against an installed wheel (the
# CUDA wheel check copies only tests/), there is nothing to read, and passing on no modules would
# pass without looking.
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists() or not SOURCES[0][0].is_dir(),
                                reason="the source tree (setup.py, python/fusedecode) is not here")

# Bottom first. A module belongs to the first layer with a pattern (fnmatch) that matches its name.
LAYERS = (
    ("base", ("fusedecode._native", "fusedecode._info", "fusedecode._validation")),
    ("shared helpers", ("fusedecode.backends", "fusedecode.head_transform", "fusedecode.tree",
                        "fusedecode.ops._outputs", "fusedecode.ops._tiled_head")),
    ("kernels", ("fusedecode.triton_kernels", "fusedecode.triton_kernels.*")),
    ("op contracts", ("fusedecode.ops.*.contract",)),
    ("op references and checks", ("fusedecode.ops.*.reference", "fusedecode.ops.*.checks")),
    ("ops", ("fusedecode.ops", "fusedecode.ops.*")),
    ("public package", ("fusedecode", "fusedecode.reference")),
    ("decoding methods", ("fusedecode.steps", "fusedecode.triggers", "fusedecode.reflection",
                          "fusedecode.confidence")),
    ("integrations", ("fusedecode.hf", "fusedecode.hf.*", "fusedecode.vllm", "fusedecode.vllm.*")),
    ("applications", ("fusedecode.demo", "fusedecode.demo.*", "fusedecode._bench", "fusedecode.__main__")),
)

# Third-party packages fusedecode works without; a project module that imports one at module level
# (or imports such a module at module level) may be imported inside a function.
OPTIONAL_PACKAGES = ("triton", "transformers", "vllm")

# Modules that are build outputs, not sources (the compiled extension, the build record): absent
# until built, so ``_native`` imports them inside a function and handles their absence.
GENERATED = ("fusedecode._C", "fusedecode._build_meta")


# ------------------------------------------------------------------------------------------------
# Reading the imports


def source_modules():
    """Module name -> (path, is a package ``__init__``) for every project source file."""
    modules = {}
    for folder, prefix in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([prefix] + parts)
            if name not in GENERATED:
                modules[name] = (path, is_package)
    return modules


def _imported_names(module, is_package, node, modules):
    """The absolute names an import statement loads: a submodule where ``from X import name`` names
    one, else ``X`` itself."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)] + ([node.module] if node.module else [])
        base = ".".join(base)
    else:
        base = node.module
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules or f"{base}.{alias.name}" in GENERATED
            else base for alias in node.names]


def read_imports(modules):
    """Every import statement's targets: ``(importer, imported, line, inside a function)``, for
    project and third-party targets alike."""
    found = []
    for module, (path, is_package) in modules.items():
        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for name in _imported_names(module, is_package, child, modules):
                        found.append((module, name, child.lineno, in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
        visit(ast.parse(path.read_text(), str(path)), False)
    return found


def layer_of(module):
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def _is_project(name):
    return (name == PACKAGE or name.startswith(PACKAGE + ".")) and name not in GENERATED


def project_edges(imports):
    """The imports between project modules: ``(importer, imported, line, inside a function)``."""
    return sorted({edge for edge in imports if _is_project(edge[1])})


def needs_optional_package(imports):
    """Project modules that load an optional third-party package when imported (directly, or through
    a project module they import at module level)."""
    top_level = [(a, b) for a, b, _, lazy in imports if not lazy]
    needs = {a for a, b in top_level if b.split(".")[0] in OPTIONAL_PACKAGES}
    while True:
        more = {a for a, b in top_level if _is_project(b) and b in needs} - needs
        if not more:
            return needs
        needs |= more


# ------------------------------------------------------------------------------------------------
# The checks


def find_cycles(edges):
    """The strongly connected components of more than one module (or a module importing itself)."""
    graph = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def upward_edges(edges):
    return [edge for edge in edges if layer_of(edge[1]) > layer_of(edge[0])]


def hidden_imports(edges, imports):
    """Imports of project modules inside functions, but for modules that need an optional package."""
    optional = needs_optional_package(imports)
    return [edge for edge in edges if edge[3] and edge[1] not in optional]


def picture():
    """The structure as text: each layer's modules and what they import, then the problems."""
    modules = source_modules()
    imports = read_imports(modules)
    edges = project_edges(imports)
    lines = []
    for index, (name, _) in reversed(list(enumerate(LAYERS))):
        members = sorted(m for m in modules if layer_of(m) == index)
        lines.append(f"[{index}] {name}")
        for module in members:
            targets = sorted({(b, lazy) for a, b, _, lazy in edges if a == module and b != module})
            shown = [b.replace("fusedecode.", ".", 1) + ("(lazy)" if lazy else "")
                     + ("(UP)" if layer_of(b) > index else "") for b, lazy in targets]
            lines.append(f"    {module.replace('fusedecode.', '.', 1)}" + (f" -> {', '.join(shown)}" if shown else ""))
    lines.append("cycles: " + ("; ".join(" <-> ".join(c) for c in find_cycles(edges)) or "none"))
    ups = upward_edges(edges)
    lines.append("upward edges: " + (", ".join(f"{a} -> {b} (line {n})" for a, b, n, _ in ups) or "none"))
    hidden = hidden_imports(edges, imports)
    lines.append("imports inside functions: " + (", ".join(f"{a} -> {b} (line {n})" for a, b, n, _ in hidden)
                                                 or "none"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Tests


def _edges():
    modules = source_modules()
    imports = read_imports(modules)
    return project_edges(imports), imports


def test_every_module_has_a_layer():
    for module in source_modules():
        layer_of(module)


def test_no_import_cycle():
    edges, _ = _edges()
    assert find_cycles(edges) == []


def test_no_upward_import():
    edges, _ = _edges()
    assert [(a, b, line) for a, b, line, _ in upward_edges(edges)] == []


def test_no_import_of_a_project_module_inside_a_function():
    edges, imports = _edges()
    assert [(a, b, line) for a, b, line, _ in hidden_imports(edges, imports)] == []


def test_kernels_import_no_op():
    edges, _ = _edges()
    assert [(a, b) for a, b, _, _ in edges if a.startswith("fusedecode.triton_kernels")
            and not b.startswith("fusedecode.triton_kernels")] == []


def test_every_package_is_installed():
    # setup.py lists the packages a wheel carries: a package missing there imports from the source
    # tree (editable install) and is absent from every wheel.
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(target, ast.Name) and target.id == "PACKAGES" for target in node.targets))
    packages = [module for module, (_, is_package) in source_modules().items() if is_package]
    assert sorted(packages) == sorted(listed)


def test_the_checks_see_what_they_guard_against():
    # A cycle, an upward edge and a hidden import planted in a made-up graph are each found.
    edges = [("fusedecode.tree", "fusedecode.backends", 1, False), ("fusedecode.backends", "fusedecode.tree", 2, True),
             ("fusedecode._validation", "fusedecode.ops._outputs", 3, False)]
    assert find_cycles(edges) == [["fusedecode.backends", "fusedecode.tree"]]
    assert upward_edges(edges) == [edges[2]]
    assert hidden_imports(edges, edges) == [edges[1]]
    optional = [("fusedecode.triton_kernels.x", "triton", 1, False), ("fusedecode.ops.y.op", "fusedecode.triton_kernels.x", 5, True)]
    assert hidden_imports(optional[1:], optional) == []


if __name__ == "__main__":
    print(picture())
    sys.exit(0)
