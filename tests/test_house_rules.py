"""House rules that hold across ``recon/``: one docstring style (Google: ``Args:``, ``Returns:``, ``Raises:``).

Static checks only (``ast``, nothing is imported), so the module stays fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "recon"
REST_FIELDS = (":param ", ":return", ":raises ")
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _rest_docstrings(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line name`` (``file`` relative to ``root``) of each docstring in ``path`` with a reST field list."""
    text = path.read_text(encoding="utf-8")
    if not any(field in text for field in REST_FIELDS):  # the common case: nothing to parse
        return []
    tree = ast.parse(text, filename=str(path))
    rel = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, _DOCUMENTED):
            continue
        doc = ast.get_docstring(node, clean=False)
        if doc and any(field in doc for field in REST_FIELDS):
            line = node.body[0].lineno
            name = "<module>" if isinstance(node, ast.Module) else node.name
            found.append(f"{rel}:{line} {name}")
    return found


def test_docstrings_are_google_style():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no modules under {PACKAGE}"
    offenders = [hit for path in files for hit in _rest_docstrings(path)]
    assert not offenders, (
        "reST field lists (:param / :return / :raises) in docstrings; use Google style "
        "(Args: / Returns: / Raises:):\n" + "\n".join(offenders)
    )


def test_scanner_flags_rest_fields(tmp_path):
    """The scan itself finds module, class and function docstrings with reST fields (and nothing else)."""
    sample = tmp_path / "recon_sample.py"
    sample.write_text(
        '"""Module.\n\n:returns: nothing.\n"""\n\n\n'
        'class C:\n    """Class.\n\n    :param x: an argument.\n    """\n\n\n'
        'def f(x):\n    """Function.\n\n    :raises ValueError: always.\n    """\n\n\n'
        'def g(x):\n    """Google.\n\n    Args:\n        x: an argument.\n    """\n',
        encoding="utf-8",
    )
    hits = _rest_docstrings(sample, root=tmp_path)
    assert hits == ["recon_sample.py:1 <module>", "recon_sample.py:8 C", "recon_sample.py:15 f"]


# ------------------------------------------------------------------------------------------ layers import down
# datasets → operators → priors → samplers → restoration → tasks → pipeline → batch → cli (docs/developer-guide.md)
LAYERS = {"recon.utils": 0, "recon.settings": 0, "recon.datasets": 1, "recon.outputs": 2, "recon.operators": 3,
          "recon.priors": 4, "recon.samplers": 5, "recon.restoration": 6, "recon.tasks": 7, "recon.pipeline": 8,
          "recon.batch": 9, "recon.calibrate": 10, "recon.cli": 11, "recon.__main__": 11}
# names the top-level package re-exports, by the layer they come from
ROOT_NAMES = {"__version__": 0, "reconstruct": 5, "ReconstructionResult": 5}


def _layer(module: str) -> int | None:
    hits = [(len(k), v) for k, v in LAYERS.items() if module == k or module.startswith(k + ".")]
    return max(hits)[1] if hits else None


def _imported(node: ast.AST) -> list[str]:
    """The recon modules an import statement reaches (``from recon import pipeline`` → ``recon.pipeline``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("recon.")]
    if isinstance(node, ast.ImportFrom) and node.module == "recon":
        return [f"recon.{a.name}" if f"recon.{a.name}" in LAYERS else a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recon."):
        return [node.module]
    return []


def test_lower_layers_never_import_higher_ones():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        own = _layer(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # lazy imports inside functions too
            for target in _imported(node):
                layer = ROOT_NAMES.get(target, _layer(target))
                if layer is not None and layer > own:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {module} imports {target}")
    assert not offenders, "a lower layer imports a higher one:\n" + "\n".join(offenders)



# --------------------------------------------------------------------------------------------- small functions
def test_no_function_is_over_100_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 100 lines:\n" + "\n".join(long)
