"""The package's shape, checked: imports only point down the layers of ../shared/ARCHITECTURE.md (function-level
imports included), and no module imports another module's private (_underscore) names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lmstack"

# lowest first; a module may import its own layer and the ones below it
LAYERS = [
    {"errors", "config", "tokenizer", "atomic"},
    {"models"},
    {"checkpoint"},
    {"convert", "data"},
    {"generate"},
    {"lm", "__init__"},
    {"train", "eval", "rag", "scaling"},
    {"serve"},
    {"cli", "__main__"},
]


def layer_of(module: str) -> int:
    """Layer of a dotted module name inside lmstack ('lmstack.generate.text' -> the generate layer)."""
    parts = module.split(".")
    assert parts[0] == "lmstack", module
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"lmstack.{top} is in no layer: add it to LAYERS (and to ARCHITECTURE.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import statement in the file, at any depth."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if not node.module and node.level:  # `from . import x`: x is a submodule, or a name of the package
                for n in names:
                    sub = PKG.parent.joinpath(*target.split("."), n)
                    is_mod = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                    out.append((node.lineno, f"{target}.{n}", []) if is_mod else (node.lineno, target, [n]))
            else:
                out.append((node.lineno, target, names))
    return out


MODULES = sorted(p for p in PKG.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for p in MODULES:
        layer_of(module_name(p)) if p.name != "__init__.py" or p.parent != PKG else None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG.parent)))
def test_imports_point_down(path):
    me = module_name(path)
    mine = layer_of(me)
    bad = []
    for line, target, _ in imports(path):
        if target == "lmstack" or target.startswith("lmstack."):
            if layer_of(target) > mine:
                bad.append(f"{path.name}:{line} imports {target} (layer {layer_of(target)} > {mine})")
    assert not bad, f"{me} reaches up: " + "; ".join(bad)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG.parent)))
def test_no_private_names_across_modules(path):
    me = module_name(path)
    bad = []
    for line, target, names in imports(path):
        if not target.startswith("lmstack") or target == me:
            continue
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                bad.append(f"{path.name}:{line} imports {target}.{n}")
    assert not bad, "private names used across modules (make them public and documented): " + "; ".join(bad)


def test_checker_catches_a_function_level_upward_import(tmp_path, monkeypatch):
    """The checker itself: a function-level import of lmstack.lm from a generate module is a violation."""
    fake = PKG / "generate" / "engine.py"
    src = "def f():\n    from ..lm import load\n    from ..serve.app import create_app\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: src if self == fake else Path.read_bytes(self).decode())
    found = [(t, layer_of(t)) for _, t, _ in imports(fake)]
    assert found == [("lmstack.lm", 5), ("lmstack.serve.app", 7)]
    assert all(layer > layer_of("lmstack.generate.engine") for _, layer in found)
