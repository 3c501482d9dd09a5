"""Check the project's TensorRT Python code against the real TensorRT bindings, without TensorRT.

The ``tensorrt-cu12-bindings`` wheels (10.3 = JetPack 6, 10.13 = JetPack 7, 11.4) hold the real
``tensorrt.so``; it links libnvinfer & co. only for a few C factories. With ``nvinfer_stub.c``
standing in for those libraries (every factory returns NULL) the real module imports, so its
classes, enum members and pybind11 signatures can be read. This proves API *use* only (names,
enum members, keyword arguments), never behaviour: nothing is built or run.

What is checked, per bindings version, in each given Python file:

- every chain rooted at the name ``trt`` (``trt.BuilderFlag.FP16``, ``trt.Runtime``) resolves;
- attributes of TensorRT objects resolve on their class. Types come from annotations
  (``engine: trt.ICudaEngine``, ``list[trt.IExecutionContext]``), from constructor calls
  (``trt.Runtime(logger)``) and from the return types in the bindings' docstrings
  (``runtime.deserialize_cuda_engine(...)`` -> ``ICudaEngine``), through local and ``self.``
  assignments and ``for`` loops;
- keyword arguments of those calls are parameters of one of the overloads;
- each file imports under that version (with ``import tensorrt`` answered by the bindings).

A use inside ``if hasattr(x, "name"):`` (or the ``else`` of ``if not hasattr(...)``) is guarded
and exempt; ``getattr(x, "name", default)`` is not an attribute access and is not checked.
Objects whose type cannot be inferred are not checked (the count of checked uses is reported).

    python plugins_trt/tests/trt_api_check.py --bindings DIR [DIR ...] FILE.py [FILE.py ...]

where each DIR is a ``pip install --target`` folder of one bindings wheel. Exit 1 on problems.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trt_stub import build_stub  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
MODULE = "<module>"
RETURN_TYPE = re.compile(r"->\s*tensorrt(?:_bindings)?\.tensorrt\.([A-Za-z_][\w.]*)")
SIGNATURE = re.compile(r"^(?:\d+\.\s*)?\w+\((.*)\)\s*->", re.M)


# ------------------------------------------------------------------ API dump

def _dump_api(import_files: list[str]) -> dict:
    """In the child process: the bindings' classes (members, return types, keyword names) and imports."""
    import importlib

    import tensorrt_bindings as trt

    sys.modules["tensorrt"] = trt  # what `import tensorrt` gives with the tensorrt-cu12 meta package
    classes: dict[str, dict] = {}

    def describe(prefix: str, cls: type) -> None:
        members = {}
        for name in dir(cls):
            value = getattr(cls, name, None)
            doc = getattr(value, "__doc__", None) or "" if callable(value) else ""
            returned = RETURN_TYPE.search(doc)
            keywords = set()
            for signature in SIGNATURE.findall(doc):
                keywords |= {p.split(":")[0].strip() for p in signature.split(",") if ":" in p}
            members[name] = {"returns": returned.group(1) if returned else None,
                             "keywords": sorted(keywords - {"self"}), "callable": callable(value),
                             "member_of_class": isinstance(value, cls)}  # an enum member, e.g. BuilderFlag.TF32
            if isinstance(value, type) and not name.startswith("__") and value.__module__.startswith("tensorrt") \
                    and f"{prefix}.{name}" not in classes:
                describe(f"{prefix}.{name}" if prefix else name, value)
        classes[prefix] = members

    module_members = {}
    for name in dir(trt):
        value = getattr(trt, name)
        if isinstance(value, type):
            describe(name, value)
        doc = (getattr(value, "__doc__", None) or "") if callable(value) and not isinstance(value, type) else ""
        returned = RETURN_TYPE.search(doc)
        module_members[name] = {"returns": returned.group(1) if returned else (name if isinstance(value, type) else None),
                                "class": isinstance(value, type), "keywords": []}
    classes[MODULE] = module_members
    imports = {}
    for file in import_files:
        path = Path(file).resolve()
        if REPO_ROOT not in path.parents:
            continue  # a copy outside the repository (the tests' injected misuse): checked statically only
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        module = ".".join(parts if parts[0] == "visiondrop_edge" else ("visiondrop_edge", *parts))  # pyproject's package-dir
        try:
            importlib.import_module(module)
            imports[file] = None
        except Exception as error:  # noqa: BLE001 - reported, not raised
            imports[file] = f"{type(error).__name__}: {error}"
    return {"version": trt.__version__, "classes": classes, "imports": imports}


def dump_api(bindings: Path, stub_dir: Path, import_files: list[Path] = ()) -> dict:
    """Run :func:`_dump_api` in a child process with ``bindings`` and the stub libraries."""
    env = dict(os.environ, PYTHONPATH=str(bindings), LD_LIBRARY_PATH=str(stub_dir), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, str(Path(__file__)), "--dump", *map(str, import_files)],
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"the bindings in {bindings} did not import with the stub: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


# ------------------------------------------------------------------ static analysis

@dataclass(frozen=True)
class Use:
    """One checked use: `what` at file:line is missing (or has an unknown keyword) in a version."""

    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


@dataclass
class Report:
    version: str
    checked: set[str] = field(default_factory=set)  # every resolved use, e.g. "IExecutionContext.execute_async_v3"
    problems: list[Use] = field(default_factory=list)


# Inferred values: ("module",), ("class", Name) for the class object, ("instance", Name),
# ("method", Class, member), ("list", value) for containers of TensorRT objects.


class _Checker:
    def __init__(self, api: dict, file: str, tree: ast.Module, report: Report):
        self.classes = api["classes"]
        self.file, self.tree, self.report = file, tree, report
        self.env: dict[tuple, tuple] = {}  # (scope, name) -> value; scope = function or class qualname
        self.guarded: set[int] = set()  # id() of Attribute nodes under a hasattr guard

    # -- types
    def _annotation(self, node: ast.AST | None):
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(node, ast.Subscript):  # list[trt.X], dict[str, trt.X], tuple[trt.X, ...]
            inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            element = next((self._annotation(e) for e in reversed(inner) if self._annotation(e)), None)
            return ("list", element) if element else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # trt.X | None
            return self._annotation(node.left) or self._annotation(node.right)
        dotted = _dotted(node)
        if dotted and dotted.startswith("trt.") and dotted[4:] in self.classes:
            return ("instance", dotted[4:])
        return None

    def _member(self, owner: str, name: str, node: ast.AST, display: str):
        """Look ``name`` up on class ``owner`` (or the module); record the use or the problem."""
        members = self.classes.get(owner, {})
        where = "tensorrt" if owner == MODULE else owner
        if id(node) in self.guarded:
            return None
        if name not in members:
            self.report.problems.append(Use(self.file, node.lineno, f"{display}: {where} has no attribute '{name}'"))
            return None
        self.report.checked.add(f"{where}.{name}")
        return members[name]

    def value(self, node: ast.AST, scope: tuple[str, ...]):
        """The inferred TensorRT value of an expression, checking attributes on the way."""
        if isinstance(node, ast.Name):
            if node.id == "trt":
                return ("module",)
            for depth in range(len(scope), -1, -1):
                found = self.env.get((scope[:depth], node.id))
                if found:
                    return found
            return None
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and len(scope) >= 1:
                return self.env.get((scope[:1], f"self.{node.attr}"))
            base = self.value(node.value, scope)
            if base is None:
                return None
            display = ast.unparse(node)
            if base[0] == "module":
                member = self._member(MODULE, node.attr, node, display)
                if member is None:
                    return None
                return ("class", node.attr) if member["class"] else ("method", MODULE, node.attr)
            if base[0] in ("class", "instance"):
                member = self._member(base[1], node.attr, node, display)
                if member is None:
                    return None
                nested = f"{base[1]}.{node.attr}"
                if nested in self.classes:
                    return ("class", nested)
                if member["callable"]:
                    return ("method", base[1], node.attr)
                # An enum member (trt.BuilderFlag.TF32) is an instance; properties and the rest are untyped.
                return ("instance", base[1]) if base[0] == "class" and member.get("member_of_class") else None
            return None
        if isinstance(node, ast.Call):
            func = self.value(node.func, scope)
            for argument in [*node.args, *(k.value for k in node.keywords)]:
                self.value(argument, scope)
            if func is None:
                return None
            if func[0] == "class":
                return ("instance", func[1])
            if func[0] == "method":
                owner, name = func[1], func[2]
                member = self.classes.get(owner, {}).get(name, {})
                known = set(member.get("keywords", ()))
                for keyword in node.keywords:
                    if known and keyword.arg and keyword.arg not in known:
                        where = "tensorrt" if owner == MODULE else owner
                        self.report.problems.append(Use(self.file, node.lineno,
                                                        f"{ast.unparse(node.func)}: {where}.{name} takes no keyword '{keyword.arg}'"))
                returned = member.get("returns")
                return ("instance", returned) if returned and returned in self.classes else None
            return None
        if isinstance(node, ast.Subscript):
            base = self.value(node.value, scope)
            self.value(node.slice, scope)
            return base[1] if base and base[0] == "list" else None
        for child in ast.iter_child_nodes(node):
            self.value(child, scope)
        return None

    # -- statements
    def _bind(self, target: ast.AST, value, scope: tuple[str, ...]) -> None:
        if value is None:
            return
        if isinstance(target, ast.Name):
            self.env.setdefault((scope, target.id), value)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            self.env.setdefault((scope[:1], f"self.{target.attr}"), value)

    def _guards(self, test: ast.AST) -> set[str]:
        names = set()
        for node in ast.walk(test):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr" \
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
        return names

    def _mark_guarded(self, statements: list[ast.stmt], names: set[str]) -> None:
        for statement in statements:
            for node in ast.walk(statement):
                if isinstance(node, ast.Attribute) and node.attr in names:
                    self.guarded.add(id(node))

    def walk(self, statements: list[ast.stmt], scope: tuple[str, ...]) -> None:
        for statement in statements:
            if isinstance(statement, ast.ClassDef):
                self.walk(statement.body, scope + (statement.name,))
            elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = scope + (statement.name,)
                arguments = statement.args
                for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                    self._bind(ast.Name(argument.arg), self._annotation(argument.annotation), inner)
                for default in [*arguments.defaults, *arguments.kw_defaults]:
                    if default is not None:
                        self.value(default, scope)
                self.walk(statement.body, inner)
            elif isinstance(statement, ast.AnnAssign):
                annotated = self._annotation(statement.annotation)
                inferred = self.value(statement.value, scope) if statement.value else None
                self._bind(statement.target, annotated or inferred, scope)
            elif isinstance(statement, ast.Assign):
                inferred = self.value(statement.value, scope)
                for target in statement.targets:
                    self._bind(target, inferred, scope)
                    if isinstance(target, ast.Attribute):
                        self.value(target.value, scope)
            elif isinstance(statement, ast.For):
                iterated = self.value(statement.iter, scope)
                self._bind(statement.target, iterated[1] if iterated and iterated[0] == "list" else None, scope)
                self.walk(statement.body, scope)
                self.walk(statement.orelse, scope)
            elif isinstance(statement, ast.If):
                names = self._guards(statement.test)
                negated = isinstance(statement.test, ast.UnaryOp) and isinstance(statement.test.op, ast.Not)
                self._mark_guarded(statement.orelse if negated else statement.body, names)
                self.value(statement.test, scope)
                self.walk(statement.body, scope)
                self.walk(statement.orelse, scope)
            elif isinstance(statement, (ast.With, ast.AsyncWith)):
                for item in statement.items:
                    self._bind(item.optional_vars, self.value(item.context_expr, scope), scope) if item.optional_vars \
                        else self.value(item.context_expr, scope)
                self.walk(statement.body, scope)
            elif isinstance(statement, ast.Try):
                for block in (statement.body, *(h.body for h in statement.handlers), statement.orelse,
                              statement.finalbody):
                    self.walk(block, scope)
            elif isinstance(statement, (ast.While,)):
                self.value(statement.test, scope)
                self.walk(statement.body, scope)
                self.walk(statement.orelse, scope)
            else:
                self.value(statement, scope)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _check_imports_bind_trt(file: str, tree: ast.Module) -> list[Use]:
    """`import tensorrt` must bind the name the checker follows: ``trt``."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tensorrt" and alias.asname != "trt":
                    problems.append(Use(file, node.lineno, "import tensorrt as trt (the name the API check follows)"))
        if isinstance(node, ast.ImportFrom) and node.module == "tensorrt":
            problems.append(Use(file, node.lineno, "use `import tensorrt as trt`, not `from tensorrt import ...`"))
    return problems


def check_file(api: dict, path: Path, display: str | None = None) -> Report:
    """Statically check one file against one version's API dump (two passes: assignments settle)."""
    display = display or str(path)
    tree = ast.parse(Path(path).read_text(), filename=display)
    report = Report(api["version"])
    checker = _Checker(api, display, tree, report)
    checker.walk(tree.body, ())  # first pass: bind names
    report.problems.clear()
    report.checked.clear()
    checker.walk(tree.body, ())  # second pass: uses before their (self.) assignment are typed too
    report.problems = sorted(set(report.problems), key=lambda u: (u.file, u.line, u.what))
    report.problems += _check_imports_bind_trt(display, tree)
    error = api.get("imports", {}).get(str(path))
    if error:
        report.problems.append(Use(display, 0, f"does not import under TensorRT {api['version']}: {error}"))
    return report


def check(files: list[Path], bindings: list[Path], stub_dir: Path) -> dict[str, Report]:
    """Every file against every bindings folder: {version: merged report}."""
    reports = {}
    for folder in bindings:
        api = dump_api(folder, stub_dir, files)
        merged = Report(api["version"])
        for file in files:
            report = check_file(api, file, _display(file))
            merged.checked |= report.checked
            merged.problems += report.problems
        reports[api["version"]] = merged
    return reports


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--dump"]:
        print(json.dumps(_dump_api(argv[1:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bindings", nargs="+", required=True, type=Path, help="pip --target folders, one per version")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--stub-dir", type=Path, default=REPO_ROOT / "build" / "trt_api_stub")
    args = parser.parse_args(argv)
    reports = check(args.files, args.bindings, build_stub(args.stub_dir))
    failed = False
    for version, report in reports.items():
        print(f"TensorRT {version} bindings: {len(report.checked)} API names used, {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  {problem}")
        failed |= bool(report.problems)
    print("API use only (names, enum members, keywords): no engine was built or run.")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
