"""What the project declares about itself matches what it needs."""

import importlib.metadata
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _floor(spec: str) -> tuple[int, ...]:
    match = re.fullmatch(r"\s*>=\s*(\d+(?:\.\d+)*)\s*", spec)
    assert match, f"not a plain lower bound: {spec!r}"
    return tuple(int(part) for part in match.group(1).split("."))


def test_the_declared_python_floor_is_what_the_dependencies_need():
    """pip refuses to install zdcp below the Python version its dependencies need (3.10 was
    declared while tensorstore, numpy and zarr 3.1 need 3.11), and the README says the same."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = _floor(declared)
    for dependency in ("tensorstore", "numpy"):  # their floors hold on every Python zdcp supports
        needed = importlib.metadata.metadata(dependency)["Requires-Python"]
        assert floor >= _floor(needed), f"{dependency} needs Python {needed}, pyproject.toml declares {declared}"
    version = ".".join(map(str, floor))
    assert f"Python {version}+" in (ROOT / "README.md").read_text()
