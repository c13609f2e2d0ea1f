"""The documentation cannot rot: every public name is documented and listed in the API reference, every
Python example in README.md and docs/*.md runs, docstring examples run, the CLI reference covers the CLI.

Code blocks: each ```python (or ```py) block of a file runs, in order, in one namespace per file, in a
temporary directory, within TIME_BUDGET_S seconds per file. To leave a block out (an illustration that needs
data, a GPU or minutes), mark it visibly: the comment ``<!-- docs-test: skip -->`` on the line before the
fence (invisible on the rendered page), or the class ``{.skip}`` in the fence's info string
(```` ```python {.skip} ````). (A bare ```` ```python skip ```` is not a fence to MkDocs' superfences: the block
would be rendered as text, so it is not a skip marker here either.)
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TIME_BUDGET_S = int(os.environ.get("NEURALODE_DOCS_BUDGET_S", "120"))

# The public API: these modules' __all__, plus the documented solver data and fixed-point solvers.
PUBLIC_MODULES = ["neuralode", "neuralode.nn", "neuralode.models", "neuralode.compiled"]
PUBLIC_EXTRA = {
    "neuralode.solvers.tableaus": ["TABLEAUS"],
    "neuralode.solvers.implicit": ["ImplicitTableau", "IMPLICIT_TABLEAUS"],
    "neuralode.solvers.rosenbrock": ["RosenbrockTableau", "ROSENBROCK_METHODS"],
    "neuralode.solvers.fixed_point": ["fixed_point", "anderson", "broyden", "FixedPointStats", "FixedPointError"],
}


def public_names() -> list[tuple[str, str, object]]:
    """(module, name, object) of every public name."""
    out = []
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        out += [(modname, name, getattr(mod, name)) for name in mod.__all__]
    for modname, names in PUBLIC_EXTRA.items():
        mod = importlib.import_module(modname)
        assert set(names) <= set(mod.__all__), f"{modname}: {set(names) - set(mod.__all__)} not in __all__"
        out += [(modname, name, getattr(mod, name)) for name in names]
    return out


def _own_doc(obj) -> str:
    """The object's own docstring ('' if none): not one inherited from a base class such as nn.Module, nor
    the signature that @dataclass writes into a class without one."""
    doc = (obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)) or ""
    if inspect.isclass(obj) and re.fullmatch(rf"{obj.__name__}\(.*\)", doc.strip(), flags=re.S):
        return ""
    return doc.strip()


def _attribute_doc(modname: str, name: str, obj) -> str:
    """The docstring of a module-level constant: a string literal right after its assignment (the
    convention mkdocstrings reads), looked up in the module that defines it."""
    import ast

    candidates = [modname] + [
        m for m, mod in sorted(sys.modules.items()) if m.startswith("neuralode") and mod is not None
    ]
    for m in candidates:
        mod = sys.modules.get(m)
        if mod is None or getattr(mod, name, None) is not obj or not getattr(mod, "__file__", None):
            continue
        tree = ast.parse(Path(mod.__file__).read_text())
        body = tree.body
        for i, node in enumerate(body[:-1]):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                nxt = body[i + 1]
                if (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    return nxt.value.value.strip()
    return ""


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined in the class itself (what the API reference renders)."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            out.append((name, value.fget))
        elif isinstance(value, (staticmethod, classmethod)):
            out.append((name, value.__func__))
        elif inspect.isfunction(value):
            out.append((name, value))
    return out


def documentation_status() -> tuple[list[str], list[str]]:
    """(all public names and methods, those without a docstring), as dotted paths."""
    everything, missing = [], []
    for modname, name, obj in public_names():
        path = f"{modname}.{name}"
        everything.append(path)
        if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
            doc = _own_doc(getattr(obj, "__wrapped__", obj) if not inspect.isclass(obj) else obj)
            doc = doc or _own_doc(obj)
        else:
            doc = _attribute_doc(modname, name, obj)
        if not doc:
            missing.append(path)
        if inspect.isclass(obj):
            for member, fn in _members(obj):
                everything.append(f"{path}.{member}")
                if not _own_doc(fn):
                    missing.append(f"{path}.{member}")
    return everything, missing


def test_every_public_name_has_a_docstring():
    everything, missing = documentation_status()
    print(f"documented: {len(everything) - len(missing)}/{len(everything)} public names and methods")
    assert not missing, f"{len(missing)} of {len(everything)} public names have no docstring:\n" + "\n".join(missing)


def test_api_reference_lists_every_public_name():
    api = (DOCS / "api.md").read_text()
    directives = set(re.findall(r"^::: *([\w.]+)", api, flags=re.M))
    listed = {f"{m}.{n}" for m, n, _ in public_names()}
    assert not listed - directives, f"docs/api.md has no `:::` entry for: {sorted(listed - directives)}"
    for target in directives:  # and names nothing that does not exist
        modname, _, attr = target.rpartition(".")
        try:
            mod = importlib.import_module(target)
        except ImportError:
            mod = importlib.import_module(modname)
            assert hasattr(mod, attr), f"docs/api.md: `::: {target}` does not exist"


def _docstring_examples():
    seen, out = set(), []
    for modname, name, obj in public_names():
        objs = [(f"{modname}.{name}", obj)]
        if inspect.isclass(obj):
            objs += [(f"{modname}.{name}.{m}", fn) for m, fn in _members(obj)]
        for path, o in objs:
            o = getattr(o, "__wrapped__", o)
            doc = _own_doc(o)
            if (">>>" in doc or "```python" in doc) and id(o) not in seen:
                seen.add(id(o))
                out.append(pytest.param(path, o, id=path))
    return out


@pytest.mark.parametrize(("path", "obj"), _docstring_examples())
def test_docstring_examples_run(path, obj, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(obj.__module__) if getattr(obj, "__module__", None) else None
    globs = {"torch": torch, **(vars(module) if module else {})}
    parser = doctest.DocTestParser()
    test = parser.get_doctest(inspect.getdoc(obj) or "", globs, path, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
    for line, code, skipped in python_blocks(inspect.getdoc(obj) or ""):  # fenced examples run as written
        if not skipped:
            exec(compile(code, f"{path} (docstring, line {line})", "exec"), dict(globs))


# ---------------------------------------------------------------------------------------------------------
# code blocks of README.md and docs/*.md

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
SKIP_COMMENT = "<!-- docs-test: skip -->"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, source, skipped) of each ```python / ```py block, indented fences included."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        lang = re.split(r"[\s{]", info.lower(), maxsplit=1)[0]
        attrs = re.findall(r"\{([^}]*)\}", info)
        classes = {w for a in attrs for w in a.split() if w.startswith(".")}
        if not lang and classes:  # ```{.python .skip}
            lang = sorted(c for c in classes if c in (".python", ".py"))[:1]
            lang = lang[0][1:] if lang else ""
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            j += 1
        if lang in ("python", "py"):
            body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            skipped = ".skip" in classes or prev == SKIP_COMMENT
            blocks.append((i + 2, textwrap.dedent("\n".join(body)) + "\n", skipped))
        i = j + 1
    return blocks


def test_block_extraction():
    text = "\n".join(
        [
            "# t",
            "```python",
            "x = 1",
            "```",
            "```bash",
            "echo no",
            "```",
            "- item",
            "    ```py",
            "    y = x + 1",
            "    ```",
            SKIP_COMMENT,
            "```python",
            "raise SystemExit",
            "```",
            "```python {.skip}",
            "raise SystemExit",
            "```",
            "```{.python .skip}",
            "raise SystemExit",
            "```",
            '```python title="a.py"',
            "z = y",
            "```",
        ]
    )
    blocks = python_blocks(text)
    assert [(line, src, skip) for line, src, skip in blocks] == [
        (3, "x = 1\n", False),
        (10, "y = x + 1\n", False),
        (14, "raise SystemExit\n", True),
        (17, "raise SystemExit\n", True),
        (20, "raise SystemExit\n", True),
        (23, "z = y\n", False),
    ]


def _markdown_files() -> list[Path]:
    """README.md and the docs pages that hold python blocks (pages without any have nothing to run)."""
    files = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))
    return [f for f in files if f.exists() and python_blocks(f.read_text())]


def test_readme_has_runnable_examples():
    assert any(not skipped for _, _, skipped in python_blocks((ROOT / "README.md").read_text()))


class _OverBudget(Exception):
    pass


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text())
    runnable = [b for b in blocks if not b[2]]
    if not runnable:
        pytest.skip(f"{path.name}: all {len(blocks)} python blocks are marked skip")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__"}
    rel = path.relative_to(ROOT)

    def over_budget(signum, frame):
        raise _OverBudget

    old = signal.signal(signal.SIGALRM, over_budget)
    signal.alarm(TIME_BUDGET_S)
    start = time.perf_counter()
    try:
        for line, src, _ in runnable:
            code = compile(src, f"{rel}:{line}", "exec")
            try:
                exec(code, namespace)
            except _OverBudget:
                pytest.fail(
                    f"{rel}: the python blocks took over {TIME_BUDGET_S} s (stopped in the block at line {line})"
                )
            except Exception as exc:
                raise AssertionError(f"{rel}: the python block at line {line} failed: {exc!r}\n{src}") from exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    took = time.perf_counter() - start
    print(f"{rel}: {len(runnable)} blocks ran in {took:.1f} s, {len(blocks) - len(runnable)} skipped")


# ---------------------------------------------------------------------------------------------------------
# the generated CLI reference


def test_cli_reference_covers_every_subcommand_and_option():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.render()
    assert hook.MARKER in (DOCS / "cli.md").read_text()
    parser = hook._parser()
    subs = hook._subcommands(parser)
    assert subs, "no subcommands found in neuralode.cli.build_parser()"
    for name, _, sub in subs:
        assert f"## `neuralode {name}`" in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert f"`{flag}" in page or f" {flag}" in page, (name, flag)
