"""The `recon` command as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "recon.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_json_reports_fbp_quality():
    out = run("demo", "--views", "90", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["views"] == 90 and len(summary["results"]) == 2
    for r in summary["results"]:
        assert r["psnr_db"] > 28.0 and 0.8 < r["ssim"] <= 1.0, r


def test_demo_rejects_bad_arguments():
    out = run("demo", "--views", "0")
    assert out.returncode != 0 and "--views" in out.stderr and "Traceback" not in out.stderr
