"""Saving and loading priors: ``recon``'s own format (safetensors weights + a JSON model card).

A prior is a folder::

    my-prior/
      model.safetensors   # network weights (the EMA weights for trained priors)
      model_card.json     # architecture and its arguments, schedule, parameterization, intensity range,
                          # resolution, training data, steps, measured quality, licence, intended use

Loading never unpickles: weights come from safetensors, everything else from JSON. A checkpoint whose keys
or shapes do not fit the architecture is refused with the first mismatches listed.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from recon.datasets.io import atomic_write_bytes
from recon.priors.base import DiffusionPrior, intensity_from_config
from recon.priors.networks import build_network
from recon.priors.schedules import schedule_from_config
from recon.utils import sha256_files

__all__ = ["BUILTIN_PRIORS", "check_state_dict", "load_prior", "save_prior", "weights_sha256"]

FORMAT = "recon-prior"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CARD = "model_card.json"

# name -> folder inside the package (recon/priors/weights/<folder>); "patch-gmm-ct" is the analytic patch
# Gaussian-mixture baseline (recon.priors.patch_gmm, card format "recon-patch-gmm")
BUILTIN_PRIORS = {"default": "default-ct", "default-ct": "default-ct", "default-mri": "default-mri",
                  "patch-gmm-ct": "patch-gmm-ct"}


def weights_sha256(prior) -> str | None:
    """SHA-256 of the weights file a prior was loaded from (``card["path"]/model.safetensors``), or None (a prior
    built in memory, or one without that file)."""
    folder = (getattr(prior, "card", None) or {}).get("path")
    weights = Path(folder) / WEIGHTS if folder else None
    return sha256_files([weights]) if weights is not None and weights.is_file() else None


def check_state_dict(module: torch.nn.Module, state: dict, source: str) -> None:
    """Raise ValueError listing the first missing/unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise ValueError(f"{source}: weights do not fit the architecture: {', '.join(parts)}")


def save_prior(prior: DiffusionPrior, folder: str | os.PathLike, architecture: dict, card: dict | None = None) -> Path:
    """Write ``prior`` as ``folder/model.safetensors`` + ``folder/model_card.json`` (atomically, file by file).

    ``architecture`` is the ``{"name", "args"}`` description the network was built from
    (``recon.priors.networks.build_network``); ``card`` adds free-form fields (training data, quality...).
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in prior.network.state_dict().items()}
    full_card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "schedule": prior.schedule.config(),
        "parameterization": prior.parameterization,
        "intensity": None if prior.intensity is None else prior.intensity.config(),
        "channels": prior.channels,
        "spatial_dims": prior.spatial_dims,
        "bytes_per_voxel": prior.bytes_per_voxel,
        **prior.card,
        **(card or {}),
    }
    atomic_write_bytes(save(state, metadata={"format": FORMAT}), folder / WEIGHTS, overwrite=True)
    atomic_write_bytes((json.dumps(full_card, indent=2) + "\n").encode(), folder / CARD, overwrite=True)
    return folder


def _builtin_folder(name: str) -> Path:
    folder = resources.files("recon.priors").joinpath("weights", BUILTIN_PRIORS[name])
    return Path(str(folder))


def load_prior(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               symmetry: str | None = None) -> DiffusionPrior:
    """Load a prior by built-in name (``"default"`` = ``"default-ct"``, ``"default-mri"``, ``"patch-gmm-ct"``)
    or from a folder in ``recon``'s format (``model.safetensors`` + ``model_card.json``). Nothing is ever
    downloaded. A folder whose card has the format ``"recon-patch-gmm"`` gives a
    :class:`recon.priors.patch_gmm.PatchGMMPrior` (same denoise/score contract; its parameters follow the
    input's device). ``symmetry="d4"`` averages each denoising over the square's rotations and flips
    (``DiffusionPrior``'s ``symmetry``; network priors only).
    """
    from safetensors.torch import load_file

    key = str(name_or_path)
    if key in BUILTIN_PRIORS:
        folder = _builtin_folder(key)
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"the built-in prior {key!r} is not in this installation (expected {folder / WEIGHTS}); "
                "train one with `recon train-prior` or pass a folder path"
            )
    else:
        folder = Path(name_or_path)
        if folder.is_file() and folder.name in (WEIGHTS, CARD):
            folder = folder.parent
        if not folder.exists():
            raise FileNotFoundError(
                f"prior {key!r} not found: give a built-in name ({', '.join(sorted(BUILTIN_PRIORS))}) or a folder "
                f"holding {WEIGHTS} and {CARD}"
            )
        for needed in (WEIGHTS, CARD):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"{folder}: missing {needed} (a recon prior folder holds {WEIGHTS} and {CARD})")
    try:
        card = json.loads((folder / CARD).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CARD}: not valid JSON ({err})") from err
    if card.get("format") == "recon-patch-gmm":
        from recon.priors.patch_gmm import load_patch_gmm

        if symmetry is not None:
            raise ValueError(f"{folder}: symmetry applies to network priors, not a patch Gaussian mixture")
        return load_patch_gmm(folder)
    if card.get("format") != FORMAT:
        raise ValueError(
            f"{folder / CARD}: not a recon prior card (format {card.get('format')!r}, expected {FORMAT!r})"
        )
    network = build_network(card["architecture"])
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{folder / WEIGHTS}: unreadable safetensors file ({err})") from err
    check_state_dict(network, state, str(folder / WEIGHTS))
    network.load_state_dict(state)
    network.eval()
    known = {"format", "format_version", "architecture", "schedule", "parameterization", "intensity", "channels",
             "spatial_dims", "bytes_per_voxel"}
    prior = DiffusionPrior(
        network,
        schedule_from_config(card["schedule"]),
        parameterization=card["parameterization"],
        intensity=intensity_from_config(card.get("intensity")),
        channels=card.get("channels", 1),
        spatial_dims=card.get("spatial_dims", 2),
        bytes_per_voxel=card.get("bytes_per_voxel", 4096.0),
        card={k: v for k, v in card.items() if k not in known} | {"path": str(folder)},
        symmetry=symmetry,
    )
    for p in prior.parameters():
        p.requires_grad_(False)
    return prior.to(device)
