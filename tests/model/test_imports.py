"""``model/`` stays light and one-way: importing it (every module) pulls in neither torchvision (the data side's
crops; timm imports it too) nor ray nor ``jobs``. Checked in a fresh interpreter, where nothing else has
imported them first."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_imports_no_torchvision_ray_or_jobs():
    code = (
        "import sys, model, model.flops, model.infer, model.keymaps, model.parallelize; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'timm', 'ray', 'jobs'}); "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
