"""The developer guide's worked example runs as written: its sampler file and its one registry line make a method
that ``recon.reconstruct`` runs, checks the options of, and that denoises better than the measurement."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import recon
from recon.samplers import METHODS, OptionError
from recon.samplers.registry import MethodSpec

GUIDE = Path(__file__).parents[1] / "docs" / "developer-guide.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


@pytest.fixture
def guide_method(tmp_path, monkeypatch):
    code, entry = _blocks()[:2]
    (tmp_path / "guide_ext").mkdir()
    (tmp_path / "guide_ext" / "__init__.py").write_text("")
    (tmp_path / "guide_ext" / "pnp.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = re.match(r'_spec\("(\w+)", "(\w+)", "(\w+)", "([^"]+)"\)', entry.strip())
    name, _, function, summary = m.groups()
    monkeypatch.setitem(METHODS, name, MethodSpec(name, "guide_ext.pnp", function, summary))
    yield name
    for module in ("guide_ext.pnp", "guide_ext"):
        sys.modules.pop(module, None)


def test_the_worked_example_is_a_working_method(guide_method, one_thread):
    from recon.operators import Inpainting
    from recon.priors import GaussianMixturePrior

    prior = GaussianMixturePrior.random((1, 8, 8), 2, seed=0)
    g = torch.Generator().manual_seed(0)
    op = Inpainting((8, 8), (torch.rand(8, 8, generator=g, dtype=torch.float64) > 0.4).double())
    x0 = prior.sample(1, generator=g)
    y = op.A(x0) + 0.05 * torch.randn(op.A(x0).shape, generator=g, dtype=x0.dtype)
    res = recon.reconstruct(op, y, prior, method=guide_method, sigma_y=0.05, steps=20)
    assert res.info["method"] == guide_method and len(res.diagnostics) == 20 and res.nfe == 20
    assert float((res.x - x0).pow(2).mean()) < 0.5 * float((y - x0).pow(2).mean())  # fills the missing pixels
    with pytest.raises(OptionError, match="has no option 'zeta'"):
        recon.reconstruct(op, y, prior, method=guide_method, zeta=1.0)
