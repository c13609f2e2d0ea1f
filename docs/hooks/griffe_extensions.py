"""Griffe extensions for the API reference (griffe reads the sources for mkdocstrings).

``NamespaceSubpackages``: document modules under implicit namespace subpackages (PEP 420) of a regular package.

``neuralode.solvers`` is a directory without ``__init__.py``: Python imports ``neuralode.solvers.tableaus``
from it, but griffe (which mkdocstrings uses to read the sources) skips such directories inside a regular
package, so ``::: neuralode.solvers.tableaus.ButcherTableau`` could not be found. Once a package is loaded,
this extension adds every such directory as a namespace module and visits its ``.py`` files, so their
objects can be documented and their imports resolved like any other module's.

``SphinxRoles``: the docstrings cross-reference in Sphinx's notation (``:func:`solve```,
``:class:`~neuralode.Status```), which Markdown would show verbatim; it shows them as code (``solve``,
``Status``).

Both are registered in mkdocs.yml under the python handler's ``options.extensions``.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|exc|data|obj|const):`(~?)([^`<]+?)(?:\s*<[^`]*>)?`")


def plain_roles(text: str) -> str:
    """``:func:`~a.b.c``` → ```c```, ``:class:`a.B``` → ```a.B``` (Markdown code)."""
    return ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = plain_roles(obj.docstring.value)


class NamespaceSubpackages(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        filepath = pkg.filepath
        if isinstance(filepath, list) or filepath is None or Path(filepath).name != "__init__.py":
            return
        self._add(pkg, Path(filepath).parent, loader)

    def _add(self, parent: griffe.Module, directory: Path, loader: griffe.GriffeLoader) -> None:
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and p.name.isidentifier()):
            if (sub / "__init__.py").exists():
                if sub.name in parent.members:
                    self._add(parent.members[sub.name], sub, loader)
                continue
            files = sorted(sub.glob("*.py"))
            if not files or sub.name in parent.members:
                continue
            namespace = griffe.Module(sub.name, filepath=[sub], parent=parent)
            parent.set_member(sub.name, namespace)
            for file in files:
                module = griffe.visit(
                    file.stem,
                    file,
                    file.read_text(encoding="utf-8"),
                    parent=namespace,
                    extensions=loader.extensions,
                    lines_collection=loader.lines_collection,
                    modules_collection=loader.modules_collection,
                )
                namespace.set_member(file.stem, module)
            self._add(namespace, sub, loader)
