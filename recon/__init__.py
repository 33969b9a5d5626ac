"""recon: medical image reconstruction and inverse problems with diffusion priors.

Subpackages (data flows one way, a lower layer never imports a higher one):
``recon.datasets`` (I/O, phantoms) → ``recon.operators`` (forward models) → ``recon.priors`` →
``recon.samplers`` → the ``recon`` command line.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
