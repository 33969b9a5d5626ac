"""Saving and loading restorers: a folder with ``model.safetensors`` + ``model_card.json`` (as ``recon``'s priors).

::

    my-restorer/
      model.safetensors   # network weights (the EMA weights for trained restorers)
      model_card.json     # format "recon-restorer"; architecture and its arguments; model kind ("resshift" or
                          # "rddm") with its schedule parameters and default sampling steps; the degradation
                          # (task, parameters, pixel size); intensity window; training data by file name; steps;
                          # measured quality; data licence; intended use (not for clinical use)

Loading never unpickles: weights come from safetensors, everything else from JSON; weights whose keys or shapes do
not fit the architecture are refused with the first mismatches listed (``recon.priors.io.check_state_dict``).
Nothing is downloaded: ``"default"`` is the restorer folder shipped inside the package, if present.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from recon.datasets.io import atomic_write_bytes
from recon.priors.base import intensity_from_config
from recon.priors.io import CARD, WEIGHTS, check_state_dict
from recon.priors.networks import build_network
from recon.restoration.degradations import Degradation
from recon.restoration.model import Restorer
from recon.restoration.schedules import schedule_from_config

__all__ = ["BUILTIN_RESTORERS", "FORMAT", "load_restorer", "save_restorer"]

FORMAT = "recon-restorer"
FORMAT_VERSION = 1
# name -> folder inside the package (recon/restoration/weights/<folder>)
BUILTIN_RESTORERS = {"default": "default-lowdose-ct", "default-lowdose-ct": "default-lowdose-ct",
                     "default-lowdose-ct-rddm": "default-lowdose-ct-rddm"}  # RDDM: the same task, for comparison
RECIPE = "recon train-restorer --preset default-lowdose-ct -o runs/restorer"


def builtin_folder(name: str) -> Path:
    """Where the built-in restorer ``name`` lives in this installation (it may be absent)."""
    return Path(str(resources.files("recon.restoration").joinpath("weights", BUILTIN_RESTORERS[name])))


def save_restorer(restorer: Restorer, folder: str | os.PathLike, architecture: dict | None = None,
                  card: dict | None = None) -> Path:
    """Write ``restorer`` as ``folder/model.safetensors`` + ``folder/model_card.json`` (atomically, file by file).

    ``architecture``: the ``{"name", "args"}`` the network was built from (default ``restorer.architecture``);
    ``card`` adds free-form fields (training data by name, quality, licence, ...)."""
    from safetensors.torch import save

    architecture = architecture or restorer.architecture
    if architecture is None:
        raise ValueError("save_restorer needs the network's architecture description")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in restorer.network.state_dict().items()}
    base = {k: v for k, v in restorer.card.items() if k != "path"}
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "model": {"kind": restorer.kind, "schedule": restorer.schedule.config(),
                  "sampling": {"steps": restorer.sampling_steps, "eta": restorer.eta}},
        "degradation": restorer.degradation.config(),
        "intensity": restorer.intensity.config(),
        "channels": 1,
        "spatial_dims": 2,
        **base,
        **(card or {}),
    }
    atomic_write_bytes(save(state, metadata={"format": FORMAT}), folder / WEIGHTS, overwrite=True)
    atomic_write_bytes((json.dumps(full, indent=2) + "\n").encode(), folder / CARD, overwrite=True)
    return folder


def load_restorer(name_or_path: str | os.PathLike = "default", device: str | torch.device = "cpu") -> Restorer:
    """Load a restorer: ``"default"`` (= ``"default-lowdose-ct"``, the folder
    ``recon/restoration/weights/default-lowdose-ct/`` of this installation) or a folder in the format above.

    Raises ``FileNotFoundError`` (a missing built-in says how to train it; nothing is downloaded) and
    ``ValueError`` for a card that is not a restorer's or weights that do not fit its architecture."""
    from safetensors.torch import load_file

    key = str(name_or_path)
    if key in BUILTIN_RESTORERS:
        folder = builtin_folder(key)
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"the built-in restorer {key!r} is not in this installation (expected {folder / WEIGHTS}); train it "
                f"with `{RECIPE}` and copy runs/restorer/restorer to {folder}, or pass a restorer folder")
    else:
        folder = Path(name_or_path)
        if folder.is_file() and folder.name in (WEIGHTS, CARD):
            folder = folder.parent
        if not folder.exists():
            raise FileNotFoundError(f"restorer {key!r} not found: give 'default' or a folder holding {WEIGHTS} and "
                                    f"{CARD} (e.g. RUN/restorer from `recon train-restorer`)")
        for needed in (WEIGHTS, CARD):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"{folder}: missing {needed} (a recon restorer folder holds {WEIGHTS} and "
                                        f"{CARD})")
    try:
        card = json.loads((folder / CARD).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CARD}: not valid JSON ({err})") from err
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        found = card.get("format") if isinstance(card, dict) else None
        hint = " (a diffusion prior: use it with `recon reconstruct --prior`)" if found == "recon-prior" else ""
        raise ValueError(f"{folder / CARD}: not a recon restorer card (format {found!r}, expected {FORMAT!r}){hint}")
    if int(card.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{folder / CARD}: written by a newer recon (format version {card['format_version']})")
    try:
        network = build_network(card["architecture"])
        schedule = schedule_from_config(card["model"]["schedule"])
        degradation = Degradation.from_config(card["degradation"])
        intensity = intensity_from_config(card["intensity"])
        sampling = card["model"].get("sampling", {})
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder / CARD}: incomplete restorer card ({type(err).__name__}: {err})") from err
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{folder / WEIGHTS}: unreadable safetensors file ({err})") from err
    check_state_dict(network, state, str(folder / WEIGHTS))
    network.load_state_dict(state)
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    known = {"format", "format_version", "architecture", "model", "degradation", "intensity", "channels",
             "spatial_dims"}
    restorer = Restorer(network, schedule, degradation, intensity, sampling_steps=sampling.get("steps"),
                        eta=sampling.get("eta", 0.0), architecture=card["architecture"],
                        card={k: v for k, v in card.items() if k not in known} | {"path": str(folder)})
    return restorer.to(device)
