"""recon: medical image reconstruction and inverse problems with diffusion priors.

Subpackages (data flows one way, a lower layer never imports a higher one):
``recon.datasets`` (I/O, phantoms) → ``recon.operators`` (forward models) → ``recon.priors`` →
``recon.samplers`` → the ``recon`` command line.

``recon.reconstruct`` (= ``recon.samplers.reconstruct``) is the one entry point to every reconstruction method;
it is imported on first use so that ``import recon`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "reconstruct"]


def __getattr__(name: str):
    if name == "reconstruct":
        from recon.samplers.base import reconstruct

        globals()["reconstruct"] = reconstruct
        return reconstruct
    raise AttributeError(f"module 'recon' has no attribute {name!r}")
