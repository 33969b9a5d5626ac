"""A tour of recon's forward operators: CT (parallel, fan, cone), MRI, blur, inpainting, super-resolution.

    python examples/operators_tour.py

Every operator is a deepinv ``LinearPhysics``: ``A`` (forward), ``A_adjoint`` (exact adjoint), noise via
``physics(x)``, composition with ``*``. Shapes are (B, C, H, W) / (B, C, D, H, W), geometry in mm.
"""

import torch
from skimage.metrics import peak_signal_noise_ratio

from recon.datasets.phantoms import shepp_logan, shepp_logan_3d
from recon.operators import (
    Blur,
    CartesianMRI,
    ConeBeamCT,
    Downsampling,
    FanBeamCT,
    Inpainting,
    MultiCoilMRI,
    ParallelBeamCT,
    TransmissionPoissonNoise,
    random_pixel_mask,
    simulate_coil_maps,
)


def psnr(x, ref):
    return peak_signal_noise_ratio(ref.squeeze().numpy(), x.squeeze().numpy(), data_range=1.0)


x = shepp_logan((128, 128), spacing=1.0)  # (1, 1, 128, 128), values in [0, 1]

# CT: 60-view parallel beam with Beer–Lambert noise (image scaled to attenuation in 1/mm), then FBP
mu = 0.02 * x
ct = ParallelBeamCT((128, 128), angles=60, noise_model=TransmissionPoissonNoise(I0=1e5, rng=torch.Generator()))
print(ct)
print(f"  sparse-view FBP PSNR: {psnr(ct.fbp(ct(mu, seed=0), filter='hann') / 0.02, x):.1f} dB")

fan = FanBeamCT((128, 128), angles=360)
print(fan, f"\n  fan-beam FBP PSNR: {psnr(fan.fbp(fan.A(x)), x):.1f} dB")

vol = shepp_logan_3d((32, 64, 64))
cone = ConeBeamCT((32, 64, 64), angles=120)
rec = cone.fbp(cone.A(vol))
print(cone, f"\n  FDK PSNR (central slab): {psnr(rec[:, :, 12:20], vol[:, :, 12:20]):.1f} dB")

# MRI: 4x Cartesian, single coil and 8-coil SENSE; images are (B, 2, H, W) = (real, imaginary)
xc = torch.cat([x, torch.zeros_like(x)], dim=1)
mri = CartesianMRI((128, 128), acceleration=4, seed=0)
print(mri, f"\n  zero-filled PSNR: {psnr(mri.A_adjoint(mri.A(xc))[:, :1], x):.1f} dB")
sense = MultiCoilMRI((128, 128), coil_maps=simulate_coil_maps((128, 128), 8), acceleration=4)
print(sense, "\n  k-space shape:", tuple(sense.A(xc).shape))

# Blur (2 mm FWHM Gaussian) followed by 2x downsampling, composed as deepinv physics
blur = Blur.gaussian((128, 128), fwhm=2.0)
down = Downsampling((128, 128), factor=2)
composed = down * blur
print(composed.__class__.__name__, tuple(composed.A(x).shape))

# Inpainting with 70% of the pixels missing
inp = Inpainting((128, 128), random_pixel_mask((128, 128), missing_fraction=0.7, seed=0))
print(inp, f"\n  kept fraction: {float((inp.A(torch.ones_like(x)) > 0).float().mean()):.2f}")
