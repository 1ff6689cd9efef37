"""Imports point one way (DESIGN.md "Layout", the contract in .importlinter): entry points -> wiring -> objectives
-> engine -> models -> data -> eval metrics | kernels -> leaves. A back-arrow, an import circle, one model family
importing another, or a registry that imports every family fails here."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([LINT_IMPORTS, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    proc = lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in proc.stdout


def test_a_back_arrow_breaks_the_contract(tmp_path):
    """The contract is not vacuous: a model module that imports the EPIC objective (the arrow issue 11 removed) or
    the engine importing the wiring is reported, naming the import."""
    shutil.copytree(ROOT / "epic", tmp_path / "epic", ignore=shutil.ignore_patterns("__pycache__"))
    heads = tmp_path / "epic" / "models" / "heads.py"
    heads.write_text(heads.read_text() + "\n\ndef _back():\n    from epic.objectives.consistency import HEAD_NAME\n")
    trainer = tmp_path / "epic" / "engine" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n\ndef _back():\n    import epic.wiring\n")
    proc = lint(tmp_path, tmp_path)
    assert proc.returncode != 0
    assert "epic.models.heads -> epic.objectives.consistency" in proc.stdout, proc.stdout[-3000:]
    assert "epic.engine.trainer -> epic.wiring" in proc.stdout


def _graph():
    import grimp  # import-linter's own graph library (installed with it)

    return grimp.build_graph("epic", cache_dir=None)  # no cache folder in the checkout


def test_no_import_circles():
    graph = _graph()
    circles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                circles.add((module,) + tuple(back))
    assert not circles, "import circles (each: a module, then the chain back to it): " + "; ".join(
        " -> ".join(c) for c in sorted(circles))


def test_families_are_independent_and_registered_lazily():
    from epic.models.registry import FAMILIES

    graph = _graph()
    packages = [f"epic.models.{name}" for name in FAMILIES if f"epic.models.{name}" in graph.modules]
    assert "epic.models.meter" in packages
    for a in packages:
        for b in packages:
            if a != b:
                assert not graph.chain_exists(importer=a, imported=b, as_packages=True), f"{a} imports {b}"
    code = ("import sys, epic.config, epic.models.registry; "
            "print(sorted(m for m in sys.modules if m.startswith('epic.models.') and m.count('.') >= 2 "
            "and m.split('.')[2] in epic.models.registry.FAMILIES)); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "False"], proc.stdout  # no family, not even torch, until one is used


# ------------------------------------------------------------------------------------------- family-neutral code
FAMILY_WORDS = ("meter", "vilt", "albef", "xvlm")
# attribute names of one family's modules that family-neutral code must reach through the interface instead
FAMILY_ATTRIBUTES = ("cross_modal_image_transform", "cross_modal_text_transform", "cross_modal_image_layers",
                     "cross_modal_text_layers", "vit_model", "text_transformer", "rank_output", "transformer")


def family_mentions(source: str) -> list[str]:
    """Identifiers, attributes, imported modules and non-docstring strings of `source` that name a model family
    or one family's module attributes (comments and docstrings may cite where a recipe comes from)."""
    import ast
    import re

    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words += [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
    family = re.compile(r"(?<![a-z])(" + "|".join(FAMILY_WORDS) + r")(?![a-z])", re.IGNORECASE)
    return [w for w in words if family.search(w.replace("_", " ").replace(".", " ")) or w in FAMILY_ATTRIBUTES]


def test_evaluation_and_engine_code_never_name_a_family():
    """epic/eval and epic/engine speak to models through epic.models.interface only (issue 11): no family import,
    no family name in code, no family's attribute names (retrieval's shortlist is the family's
    retrieval_embeddings)."""
    found = {str(path.relative_to(ROOT)): hits for folder in ("eval", "engine")
             for path in sorted((ROOT / "epic" / folder).glob("*.py"))
             if (hits := family_mentions(path.read_text()))}
    assert not found, found


def test_the_family_name_check_can_fail():
    assert family_mentions("from epic.models.meter import METER\n") and family_mentions("x = m.vit_model(p)\n")
    assert family_mentions("v = model.cross_modal_image_transform(e)\n")
    assert family_mentions("if family == 'vilt':\n    pass\n")
    assert not family_mentions('"""METER ranks by the ITM logit."""\nx = model.retrieval_embeddings(a, b, c)  # METER\n')
