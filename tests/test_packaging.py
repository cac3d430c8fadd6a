"""What the project declares about itself matches what it needs."""

import importlib.metadata
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_declared_python_floor_is_what_zarr_needs():
    """zdcp needs zarr >= 3.1, which needs Python 3.11: pip refuses to install zdcp on an
    older Python when it declares so (3.10 was declared, and failed at zarr), and the README
    says the same. Checked where the installed zarr is of the oldest series zdcp allows (on
    newer Pythons pip takes a newer zarr, whose own floor may be higher)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=(\d+\.\d+)", project["requires-python"]).group(1)
    assert f"Python {floor}+" in (ROOT / "README.md").read_text()
    allowed = next(r for r in project["dependencies"] if r.startswith("zarr"))
    oldest = re.search(r">=(\d+\.\d+)", allowed).group(1)
    installed = importlib.metadata.version("zarr")
    if _version(installed)[:2] == _version(oldest):
        needed = re.fullmatch(r">=(\d+\.\d+)", importlib.metadata.metadata("zarr")["Requires-Python"]).group(1)
        assert _version(floor) >= _version(needed), f"zarr {installed} needs Python {needed}, zdcp declares {floor}"
