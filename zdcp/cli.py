"""The ``zdcp`` command (also ``python -m zdcp``): inspect, verify and convert checkpoints.

    zdcp inspect PATH [--json]
    zdcp verify PATH
    zdcp convert SRC DST [--to FORMAT] [--max-shard-size SIZE] [--drop-values] [--overwrite]

A user error (missing path, not a checkpoint, unsupported conversion) is one line on stderr and
exit status 1; a fault found by ``verify`` is exit status 1 too; bad arguments are status 2.
Long work shows a progress bar when stderr is a terminal, unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import format_utils
from .errors import CheckpointNotFoundError, UsageError, ZdcpError
from .format.names import describe
from .storage.contents import holds_commit_record
from .storage.layout import DEFAULT_LAYOUT, layout_names, layouts
from .storage.location import Location
from .view import Array, Group
from .view import open as open_checkpoint

__all__ = ["main", "detect_format", "FORMATS"]

FORMATS = ("zdcp", "dcp", "torch", "safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ZdcpError, OSError, ValueError) as e:
        print(f"zdcp {args.command}: error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdcp", description="Inspect, verify and convert zdcp checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show the tree of arrays, values and sizes")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_inspect)

    verify = commands.add_parser("verify", help="read every chunk; report damage (exit 1 on any fault)")
    verify.add_argument("path")
    verify.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    verify.set_defaults(run=_verify)

    convert = commands.add_parser("convert", help="convert between zdcp, DCP, torch.save and safetensors")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=FORMATS, help="format of DST (default: from its name, else zdcp)")
    convert.add_argument("--max-shard-size", type=_size, help="safetensors: shard size, e.g. 5GB (DST is a directory)")
    convert.add_argument("--drop-values", action="store_true", help="safetensors: leave out non-tensor values")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing zdcp checkpoint at DST")
    layout_help = "; ".join(f"{layout.name}: {layout.description}" for layout in layouts())
    convert.add_argument(
        "--layout", choices=layout_names(), help=f"how a zdcp DST is stored ({layout_help}); default: {DEFAULT_LAYOUT}"
    )
    convert.add_argument("--allow-pickle", action="store_true", help="unpickle/pickle values (trusted files only)")
    convert.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    convert.set_defaults(run=_convert)
    return parser


# -- inspect ------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    root = open_checkpoint(_existing(args.path))
    info = root.info
    if args.json:
        nodes = [_node_json(path, child) for path, child in root.walk()]
        print(json.dumps({"path": Location(args.path).url, "committed": True, "info": info, "nodes": nodes}))
        return 0
    print(
        f"{args.path}: zdcp format {info.get('format_version')}, committed, saved by {info.get('world_size')} "
        f"rank(s) with torch {info.get('torch_version')}"
    )
    for path, child in root.walk():
        indent = "  " * (len(path) - 1)
        name = str(path[-1])
        if isinstance(child, Group):
            count, nbytes = _totals(child)
            kind = "list" if child.is_list else "group"
            print(f"{indent}{name}/  ({kind}: {count} arrays, {_human(nbytes)})")
        elif isinstance(child, Array):
            dtype = str(child.dtype).removeprefix("torch.")
            shape = "x".join(map(str, child.shape)) or "scalar"
            chunks = "x".join(map(str, child.chunks)) or "scalar"
            print(f"{indent}{name}  {dtype} {shape}  chunks {chunks}  {_human(child.nbytes)}")
        else:
            print(f"{indent}{name} = {_short_repr(child)}")
    count, nbytes = _totals(root)
    print(f"total: {count} arrays, {_human(nbytes)}")
    return 0


def _totals(group: Group) -> tuple[int, int]:
    arrays = [a for _, a in group.arrays()]
    return len(arrays), sum(a.nbytes for a in arrays)


def _node_json(path: tuple[Any, ...], child: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"path": describe(path), "keys": list(path)}
    if isinstance(child, Group):
        count, nbytes = _totals(child)
        node.update(type="list" if child.is_list else "group", arrays=count, nbytes=nbytes)
    elif isinstance(child, Array):
        node.update(
            type="array",
            dtype=str(child.dtype).removeprefix("torch."),
            shape=list(child.shape),
            chunks=list(child.chunks),
            nbytes=child.nbytes,
            placement=child.placement,
        )
    else:
        node.update(type="value", value=_jsonable(child))
    return node


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no nan/inf
        return repr(value)
    if isinstance(value, (bytes, io.BytesIO)):  # JSON has no byte strings
        return _short_repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# -- verify -------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    path = _existing(args.path)
    with _progress(args.quiet, _stored_bytes(path), "verify") as progress:
        report = verify(path, progress=progress)
    for fault in report.faults:
        print(f"FAULT {fault}")
    for name in report.foreign:
        print(f"foreign, ignored: {name} (not part of the checkpoint)")
    status = "OK" if report.ok else f"{len(report.faults)} FAULT(S)"
    read = f"{report.arrays} arrays, {report.chunks} chunks, {_human(report.bytes)}"
    print(f"{status}: {read} read from {report.checkpoint}")
    return 0 if report.ok else 1


def _stored_bytes(path: str) -> int | None:
    try:
        return sum(a.nbytes for _, a in open_checkpoint(path).arrays())
    except ZdcpError:
        return None


# -- convert ------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str], *, exists: bool = True) -> str | None:
    """The checkpoint format at ``path`` (or, for a path that does not exist yet, the one its
    name implies); None when it cannot be told. Object store locations hold zdcp checkpoints."""
    if _is_url(path):
        return "zdcp"
    p = Path(_local(os.fspath(path)))
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return "torch"
    hf_directory = (p / format_utils.SAFETENSORS_INDEX).is_file() or (p / "model.safetensors").is_file()
    if suffix == ".safetensors" or hf_directory:
        return "safetensors"
    if (p / ".metadata").is_file():
        return "dcp"
    if holds_commit_record(p) or (p.is_dir() and not exists):
        return "zdcp"
    return None


def _convert(args: argparse.Namespace) -> int:
    src = _existing(args.src)
    source = detect_format(src)
    if source is None:
        raise UsageError(f"cannot tell the format of {src}: not a zdcp, DCP, torch.save or safetensors checkpoint")
    target = args.to or detect_format(args.dst, exists=False) or ("zdcp" if source != "zdcp" else None)
    if target is None:
        raise UsageError(f"cannot tell which format {args.dst} should be: pass --to {{{','.join(FORMATS[1:])}}}")
    if (source == "zdcp") == (target == "zdcp"):
        raise UsageError(f"convert goes to or from zdcp, not {source} -> {target}")
    for path, kind in ((src, source), (args.dst, target)):
        if kind != "zdcp" and _is_url(path):
            raise UsageError(f"{path}: {kind} checkpoints are read and written in local files only")
    total = _stored_bytes(src) if source == "zdcp" else None
    with _progress(args.quiet, total, f"{source} -> {target}") as progress:
        _CONVERSIONS[(source, target)](src, args.dst, args, progress)
    print(f"converted {source} {src} -> {target} {args.dst}")
    return 0


_CONVERSIONS: dict[tuple[str, str], Callable[[str, str, argparse.Namespace, Any], None]] = {
    ("torch", "zdcp"): lambda s, d, a, p: format_utils.torch_save_to_zdcp(
        s, d, overwrite=a.overwrite, allow_pickle=a.allow_pickle, layout=a.layout, progress=p
    ),
    ("zdcp", "torch"): lambda s, d, a, p: format_utils.zdcp_to_torch_save(
        s, d, allow_pickle=a.allow_pickle, progress=p
    ),
    ("dcp", "zdcp"): lambda s, d, a, p: format_utils.dcp_to_zdcp(
        s, d, overwrite=a.overwrite, layout=a.layout, progress=p
    ),
    ("zdcp", "dcp"): lambda s, d, a, p: format_utils.zdcp_to_dcp(s, d, allow_pickle=a.allow_pickle, progress=p),
    ("safetensors", "zdcp"): lambda s, d, a, p: format_utils.safetensors_to_zdcp(
        s, d, overwrite=a.overwrite, layout=a.layout, progress=p
    ),
    ("zdcp", "safetensors"): lambda s, d, a, p: format_utils.zdcp_to_safetensors(
        s, d, max_shard_size=a.max_shard_size, drop_values=a.drop_values, progress=p
    ),
}


# -- shared -------------------------------------------------------------------------------------


def _existing(path: str) -> str:
    if not _is_url(path) and not os.path.exists(_local(path)):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    return path


def _is_url(path: str | os.PathLike[str]) -> bool:
    """An object store or memory location (zdcp checkpoints only), not a local path."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def _local(path: str) -> str:
    """A local path, given as a path or a ``file://`` URL."""
    return Location(path).url if path.startswith("file://") else path


@contextmanager
def _progress(quiet: bool, total: int | None, what: str) -> Iterator[Callable[[int], None] | None]:
    """A byte-counting progress bar on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr) as bar:
        yield bar.update


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 5GB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _short_repr(value: Any, limit: int = 80) -> str:
    text = f"BytesIO({value.getvalue()!r})" if isinstance(value, io.BytesIO) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
