"""scripts/gpu-check, here: a machine without a GPU gets a clean "no GPU" report, exit 0, and its JSON.

On a lent GPU machine the same script reads the real driver through NVML; here it proves the
rest of its path: the examples packed offline, `kbundle doctor` and `kbundle doctor BUNDLE`
run as a user runs them, kbundle's verdict for each bundle, the JSON written.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


def test_gpu_check_reports_no_gpu_cleanly_and_writes_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CONDA_PREFIX")}
    out = tmp_path / "report" / "gpu-check.json"
    proc = subprocess.run(
        [str(SCRIPT), "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("no GPU: "), proc.stdout
    assert lines[-1].startswith(f"wrote {out}")

    report = json.loads(out.read_text())
    assert report["gpu"] is False and report["nvml"]["available"] is False and report["nvml"]["reason"]
    assert report["doctor"]["exit"] in (0, 4) and report["doctor"]["json"]["gpus"] == []
    (bundle,) = report["bundles"]  # examples/warp-speed: TensorFlow 2.3.1, CUDA 10.1, cuDNN 7.6
    assert bundle["name"] == "warp-speed" and bundle["pack"]["exit"] == 0
    assert bundle["doctor"]["exit"] in (0, 4) and bundle["doctor"]["json"]["cuda"] == "10.1"
    verdict = bundle["verdict"]
    assert (verdict["cuda"], verdict["cudnn"], verdict["ok"], verdict["gpus"]) == ("10.1", "7.6", False, [])
    assert any(f["topic"] == "runtime" and "no NVIDIA GPU found" in f["message"] for f in verdict["findings"])
    assert "warp-speed: CUDA 10.1, cuDNN 7.6: no GPU here" in proc.stdout
    assert not any("traceback" in step for step in (report["doctor"], bundle["pack"], bundle["doctor"]))
