"""Load the Lambda handlers from functions/<name>/app.py in process.

Every function folder has its own app.py (the SAM convention), so they are loaded by path
under distinct module names rather than imported as one package."""

import importlib.util
import itertools
import sys
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS_DIR = REPO_ROOT / "functions"

_fresh_ids = itertools.count(1)


def _load(name: str, module_name: str):
    path = FUNCTIONS_DIR / name / "app.py"
    if not path.is_file():
        raise LookupError(f"no function folder {name!r} under {FUNCTIONS_DIR}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@cache
def load_function_module(name: str):
    return _load(name, f"avatarflow_fn_{name}")


def load_handler(name: str):
    return load_function_module(name).handler


def load_fresh_handler(name: str):
    """A new instance of functions/<name>/app.py (its own module globals and cached clients),
    like a fresh Lambda execution environment: the local runtime loads its handlers this way
    after pointing boto3 at its endpoint and setting the functions' environment."""
    return _load(name, f"avatarflow_local_fn_{name}_{next(_fresh_ids)}").handler
