"""The house rules a newcomer relies on, checked on the source: short functions, packages imported as packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for d in ("aae_ray", "serve", "labeling_ui") for p in sorted((ROOT / d).rglob("*.py"))]
MAX_FUNCTION_LINES = 60


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_library_function_is_longer_than_a_screen():
    assert len(LIBRARY) > 40  # the rule looks where the library is
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in LIBRARY for f in _functions(p) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these into named steps: " + ", ".join(long)


def test_code_is_imported_as_packages_not_loaded_by_file_path():
    # serve/ and labeling_ui/ are installed packages: loading a file by path would need Ray's pickle-by-value
    # workaround to ship its classes to workers, and two copies of one module could disagree.
    found = [f"{p.relative_to(ROOT)}: {w}" for p in LIBRARY for w in ("spec_from_file_location",
                                                                     "register_pickle_by_value")
             if w in p.read_text()]
    assert not found, ", ".join(found)
