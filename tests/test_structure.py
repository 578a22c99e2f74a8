"""The package's import structure: no import cycles among lss_plugin modules, no private names across them.

The graph is read from the source with `ast` (no module is imported), so these tests need neither torch nor the
frameworks. Every `import` / `from ... import` counts, at module level and inside functions alike: a cycle closed
by a function-level import still means two modules that each need the other to be understood. Only the
body of an ``if __name__ == "__main__":`` block is left out: it runs when the file is a script (``python -m``),
where the module is ``__main__`` and importing it under its own name is a second, independent module.
"""
import ast
import pathlib
import tempfile
import unittest

PACKAGE = "lss_plugin"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# Private names one module may import from another, as (importer, provider, name). Keep it empty: a name another
# module needs is part of its provider's interface and gets a public name and a docstring.
PRIVATE_ALLOWED: set[tuple[str, str, str]] = set()


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and getattr(test.comparators[0], "value", None) == "__main__")


def import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node of a module, at any depth, except inside a ``__main__`` guard."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo += [child for child in ast.iter_child_nodes(node) if not is_main_guard(child)]


def resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a (possibly relative) `from` import names."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(modules: dict[str, pathlib.Path]):
    """Yield (importer, provider, name or None) for every import of an lss_plugin module inside the package.

    `from pkg import sub` where `sub` is a module yields (importer, "pkg.sub", None); `from mod import name`
    yields (importer, "mod", name).
    """
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        yield importer, alias.name, None
            elif isinstance(node, ast.ImportFrom):
                provider = resolve(importer, is_package, node.level, node.module)
                if provider not in modules:
                    continue
                for alias in node.names:
                    submodule = f"{provider}.{alias.name}"
                    if submodule in modules:
                        yield importer, submodule, None
                    else:
                        yield importer, provider, alias.name


def private_attribute_uses(modules: dict[str, pathlib.Path]):
    """Yield (importer, provider, name) for ``alias._name`` where ``alias`` is an imported lss_plugin module."""
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        aliases[alias.asname or alias.name] = alias.name
            else:
                provider = resolve(importer, path.name == "__init__.py", node.level, node.module)
                for alias in node.names:
                    if f"{provider}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{provider}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                yield importer, aliases[node.value.id], node.attr


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    graph = {name: set() for name in modules}
    for importer, provider, _ in imports(modules):
        # A package's __init__ importing its own submodules (and those importing names the __init__ re-exports)
        # is how a package is assembled, not a dependency between two concepts; only edges between distinct
        # modules that are not each other's package count.
        if provider == importer or importer.startswith(provider + ".") and modules[provider].name == "__init__.py":
            continue
        graph[importer].add(provider)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_imports(modules: dict[str, pathlib.Path]) -> list[tuple[str, str, str]]:
    imported = {(importer, provider, name) for importer, provider, name in imports(modules)
                if name is not None and name.startswith("_") and not name.startswith("__")}
    return sorted({use for use in imported | set(private_attribute_uses(modules)) if use[0] != use[1]}
                  - PRIVATE_ALLOWED)


class TestStructure(unittest.TestCase):
    def test_graph_sees_known_edges(self):
        # Guards the test itself: a parser that found no edges would report no cycles.
        modules = package_modules()
        graph = import_graph(modules)
        self.assertIn("lss_plugin.plan", modules)
        self.assertIn("lss_plugin.comm", graph["lss_plugin.attention"])
        self.assertGreater(sum(len(v) for v in graph.values()), 100)

    def test_cycle_finder_finds_a_cycle(self):
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_only_a_main_guard_is_left_out(self):
        tree = ast.parse("import a\ndef f():\n    import b\nif __name__ == '__main__':\n    import c\n")
        self.assertEqual(sorted(n.names[0].name for n in import_nodes(tree)), ["a", "b"])

    def test_private_finder_sees_imported_names_and_module_attributes(self):
        with tempfile.TemporaryDirectory() as tmp:
            pkg = pathlib.Path(tmp)
            (pkg / "__init__.py").write_text("")
            (pkg / "a.py").write_text("_x = _y = _z = 1\n")
            (pkg / "b.py").write_text("from pkg.a import _x\nimport pkg.a as m\nfrom . import a\n"
                                      "def f():\n    return m._y + a._z + a.__name__\n")
            modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
            self.assertEqual(private_imports(modules), [("pkg.b", "pkg.a", name) for name in ("_x", "_y", "_z")])
            self.assertEqual(cycles(import_graph(modules)), [])

    def test_no_import_cycles(self):
        self.assertEqual(cycles(import_graph(package_modules())), [])

    def test_no_private_names_across_modules(self):
        self.assertEqual(private_imports(package_modules()), [])


if __name__ == "__main__":
    modules = package_modules()
    print("cycles:", cycles(import_graph(modules)))
    print("private imports:", *private_imports(modules), sep="\n  ")
