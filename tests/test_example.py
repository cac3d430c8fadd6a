"""The README's example runs as documented: save on 2 gloo ranks, load on 3, then without a
process group, then read with zarr-python."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tutorial.py"


def _run(example, tmp_path):
    out = subprocess.run(
        [sys.executable, str(example), "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_tutorial_example_runs(tmp_path):
    out = _run(EXAMPLE, tmp_path)
    assert "saved on 2 cpu rank(s)" in out.stdout
    assert "loaded on 3 cpu rank(s): model and optimizer state identical" in out.stdout
    assert "loaded without a process group into a plain nn.Module: identical" in out.stdout
    assert "chunks (8, 16)" in out.stdout
    assert "Warning" not in out.stderr


def test_train_loop_example_resumes_a_killed_run_at_another_world_size(tmp_path):
    out = _run(EXAMPLE.parent / "train_loop.py", tmp_path)
    assert "2 ranks, killed with SIGKILL at step 12" in out.stdout
    assert "losses equal the uninterrupted run's for every step" in out.stdout
    assert "checkpoints kept: steps [4, 8, 12, 14, 16]" in out.stdout
    run = tmp_path / "train_loop" / "interrupted"
    assert sorted(p.name for p in run.iterdir()) == ["step_12", "step_14", "step_16", "step_4", "step_8"]
