"""The zdcp command: inspect, verify, convert; exit codes; one clear line for user errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_bitwise_equal

import zdcp
from zdcp.cli import main


def _save(path, **options):
    sd = {
        "model": {"w": torch.arange(12.0).reshape(4, 3), "b": torch.ones(3).bfloat16()},
        "optim": {"param_groups": [{"lr": 0.1}]},
        "step": 7,
    }
    zdcp.save(sd, path, **options)
    return sd, path


@pytest.fixture
def saved(tmp_path):
    return _save(tmp_path / "ck")


@pytest.fixture
def saved_files(tmp_path):
    """``saved`` in the files layout: for tests that damage its files by name."""
    return _save(tmp_path / "ck", layout="files")


def test_inspect_tree_and_json(saved, capsys):
    _, ck = saved
    assert main(["inspect", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "zdcp format 3, committed, saved by 1 rank(s)" in out
    assert "  w  float32 4x3  chunks 4x3  48 B" in out
    assert "  b  bfloat16 3  chunks 3  6 B" in out
    assert "model/  (group: 2 arrays, 54 B)" in out
    assert "step = 7" in out and "total: 2 arrays, 54 B" in out
    assert main(["inspect", str(ck), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["committed"] and doc["info"]["world_size"] == 1
    nodes = {n["path"]: n for n in doc["nodes"]}
    assert nodes["model/w"] == {"path": "model/w", "keys": ["model", "w"], "type": "array", "dtype": "float32",
                                "shape": [4, 3], "chunks": [4, 3], "nbytes": 48, "placement": {"type": "Tensor"}}
    assert nodes["optim/param_groups"]["value"] == [{"lr": 0.1}]
    assert nodes["model"]["arrays"] == 2


def test_verify_reports_flipped_byte_and_missing_chunk(saved_files, capsys, tmp_path):
    _, ck = saved_files
    assert main(["verify", str(ck)]) == 0
    assert capsys.readouterr().out.startswith("OK: 2 arrays, 2 chunks, 54 B")
    damaged = tmp_path / "damaged"
    shutil.copytree(ck, damaged)
    chunk = damaged / "model/w/c.0.0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x40
    chunk.write_bytes(bytes(data))
    (damaged / "model/b/c.0").unlink()
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "FAULT model/w chunk 0.0:" in out and "Digest mismatch" in out
    assert "FAULT model/b chunk 0:" in out and "missing" in out
    assert "2 FAULT(S)" in out


def test_verify_catches_metadata_faults(saved_files, capsys, tmp_path):
    _, ck = saved_files
    (ck / "model/zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (ck / "model/w/c.9.0").write_bytes(b"stray")
    assert main(["verify", str(ck)]) == 1
    out = capsys.readouterr().out
    assert "FAULT model: zarr.json differs from the root's consolidated copy" in out
    assert "unexpected file 'model/w/c.9.0'" in out
    (ck / "zarr.json").unlink()
    assert main(["verify", str(ck)]) == 1
    assert "incomplete checkpoint" in capsys.readouterr().out


def test_convert_detects_formats(saved, tmp_path, capsys):
    sd, ck = saved
    assert main(["convert", str(ck), str(tmp_path / "out.pt"), "-q"]) == 0
    assert torch.equal(torch.load(tmp_path / "out.pt")["model"]["w"], sd["model"]["w"])
    assert main(["convert", str(tmp_path / "out.pt"), str(tmp_path / "from_pt")]) == 0
    assert zdcp.open(tmp_path / "from_pt")["step"] == 7
    assert main(["convert", str(ck), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    assert main(["convert", str(tmp_path / "dcp"), str(tmp_path / "from_dcp")]) == 0
    assert zdcp.open(tmp_path / "from_dcp")["optim/param_groups"] == [{"lr": 0.1}]
    assert main(["convert", str(ck), str(tmp_path / "m.safetensors"), "--drop-values"]) == 0
    assert_bitwise_equal(safetensors.torch.load_file(tmp_path / "m.safetensors")["model.b"], sd["model"]["b"])
    assert main(["convert", str(ck), str(tmp_path / "hf"), "--to", "safetensors", "--drop-values",
                 "--max-shard-size", "50B"]) == 0
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "from_hf")]) == 0
    assert set(zdcp.open(tmp_path / "from_hf")) == {"model.w", "model.b"}
    capsys.readouterr()
    assert main(["convert", str(ck), str(tmp_path / "nowhere")]) == 1
    assert "pass --to" in capsys.readouterr().err
    assert main(["convert", str(ck), str(tmp_path / "x.safetensors")]) == 1
    assert "drop_values" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "out.pt"), str(tmp_path / "from_pt")]) == 1
    assert "overwrite" in capsys.readouterr().err


def test_user_errors_are_one_line_and_nonzero(tmp_path):
    (tmp_path / "plain").mkdir()
    for args, message in [
        (["inspect", str(tmp_path / "missing")], "no such file or directory"),
        (["verify", str(tmp_path / "missing")], "no such file or directory"),
        (["inspect", str(tmp_path / "plain")], "no checkpoint at"),
        (["convert", str(tmp_path / "plain"), str(tmp_path / "x")], "cannot tell the format"),
    ]:
        run = subprocess.run([sys.executable, "-m", "zdcp", *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, (args, run.stderr)
        assert run.stderr.count("\n") == 1 and message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr
    script = Path(sys.executable).with_name("zdcp")  # the console script installed beside python
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "inspect" in run.stdout


def _on_a_terminal(argv):
    """Run ``python -m zdcp argv`` with stderr on a pseudo-terminal; its exit status and what it
    wrote there."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    leader, follower = pty.openpty()
    # A terminal 80 columns wide (a new pseudo-terminal has none, and tqdm draws to its width).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        run = subprocess.Popen([sys.executable, "-m", "zdcp", *argv], stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        written, deadline = b"", time.monotonic() + 120
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1)[0]:
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not data:
                break
            written += data
        return run.wait(10), written.decode(errors="replace")
    finally:
        os.close(leader)


def test_long_commands_show_a_progress_bar_on_a_terminal_and_none_when_piped(tmp_path):
    zdcp.save({"w": torch.randn(512, 512), "b": torch.randn(8)}, tmp_path / "ck")
    torch.save({"w": torch.randn(256, 256)}, tmp_path / "model.pt")
    safetensors.torch.save_file({"w": torch.randn(256, 256)}, tmp_path / "model.safetensors")
    commands = {  # the bar's label, and what it shows when done
        "verify": (["verify", str(tmp_path / "ck")], "100%|"),
        "zdcp -> torch": (["convert", str(tmp_path / "ck"), str(tmp_path / "out.pt")], "100%|"),
        "zdcp -> safetensors": (["convert", str(tmp_path / "ck"), str(tmp_path / "out.safetensors")], "100%|"),
        # sizes the source does not tell up front: the bytes written
        "torch -> zdcp": (["convert", str(tmp_path / "model.pt"), str(tmp_path / "from-torch")], "256kB"),
        "safetensors -> zdcp": (["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "st")], "256kB"),
    }
    for bar, (argv, done) in commands.items():
        status, written = _on_a_terminal(argv)
        assert status == 0 and f"{bar}: {done}" in written, (argv, written)
    for argv in (commands["verify"][0], ["convert", str(tmp_path / "ck"), str(tmp_path / "again.safetensors")]):
        piped = subprocess.run([sys.executable, "-m", "zdcp", *argv], capture_output=True, timeout=120)
        assert piped.returncode == 0 and piped.stderr == b"", (argv, piped.stderr)
