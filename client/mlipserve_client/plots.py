"""PNG plots of workflow results for the command line (the optional ``cli`` extra: matplotlib).

One figure per structure (E–V points with their Birch–Murnaghan fit; phonon bands beside the DOS;
the elastic tensor as a table of colours), and one for all diatomic curves. A relaxation has no
plot. Every figure is FIGSIZE inches at DPI, so its PNG is 800 x 500 pixels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import units
from ase.data import chemical_symbols
from ase.eos import birchmurnaghan

from mlipserve_client.workflow_types import DiatomicResult, ElasticResult, EOSResult, PhononResult

FIGSIZE = (8.0, 5.0)
DPI = 100
INSTALL_HINT = "plots need matplotlib: pip install 'mlipserve-client[cli]'"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    # No bbox_inches="tight": it would change the pixel size from figure to figure.
    figure.savefig(path, dpi=DPI)
    _pyplot().close(figure)
    return path


def _slug(label: str) -> str:
    """A file name's part for a structure's label (``dir/file.cif@2``: ``file.cif_2``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(label).name).strip("_")


def plot_eos(result: EOSResult, label: str, path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGSIZE)
    volumes = np.linspace(min(result.volumes.min(), result.v0), max(result.volumes.max(), result.v0), 200)
    fit = birchmurnaghan(volumes, result.e0, result.b0_gpa * units.GPa, result.b0_prime, result.v0)
    axes.plot(result.volumes, result.energies, "o", label="evaluated")
    axes.plot(volumes, fit, "-", label=f"Birch–Murnaghan: B0 = {result.b0_gpa:.1f} GPa, B0' = {result.b0_prime:.2f}")
    axes.axvline(result.v0, color="grey", lw=0.8, ls=":")
    axes.set(xlabel="volume (Å³)", ylabel="energy (eV)", title=f"{label}: V0 = {result.v0:.3f} Å³")
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


def _band_ticks(result: PhononResult) -> list[tuple[float, str]]:
    """(path length, label) at the segment ends; a break in the path shows both labels, "X|Y"."""
    labels = iter(result.band_labels)
    ticks = [(float(result.band_distances[0][0]), next(labels, ""))]
    for k, distances in enumerate(result.band_distances):
        label = next(labels, "")
        if k + 1 < len(result.band_distances) and not result.band_connections[k]:
            label = f"{label}|{next(labels, '')}"
        ticks.append((float(distances[-1]), label))
    return ticks


def plot_phonons(result: PhononResult, label: str, path: Path) -> Path:
    plt = _pyplot()
    figure, (bands, dos) = plt.subplots(1, 2, figsize=FIGSIZE, sharey=True, gridspec_kw={"width_ratios": (3, 1)})
    for distances, frequencies in zip(result.band_distances, result.band_frequencies_thz, strict=True):
        bands.plot(distances, frequencies, color="C0", lw=1)
    ticks = _band_ticks(result)
    for x, _ in ticks:
        bands.axvline(x, color="grey", lw=0.5)
    bands.axhline(0, color="grey", lw=0.5)
    bands.set_xticks([x for x, _ in ticks], [t for _, t in ticks])
    bands.set(xlim=(ticks[0][0], ticks[-1][0]), ylabel="frequency (THz)", title=label)
    dos.plot(result.dos, result.dos_frequencies_thz, color="C0")
    dos.set(xlabel="DOS (states/THz)", xlim=(0, None))
    figure.tight_layout()
    return _save(figure, path)


def plot_elastic(result: ElasticResult, label: str, path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGSIZE)
    tensor = result.tensor_gpa
    limit = max(float(np.abs(tensor).max()), 1e-9)
    image = axes.imshow(tensor, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for (i, j), value in np.ndenumerate(tensor):
        axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    names = ["xx", "yy", "zz", "yz", "xz", "xy"]
    axes.set_xticks(range(6), names)
    axes.set_yticks(range(6), names)
    axes.set_title(f"{label}: C_ij (GPa), K_VRH = {result.k_vrh_gpa:.1f}, G_VRH = {result.g_vrh_gpa:.1f} GPa")
    figure.colorbar(image, ax=axes, label="GPa")
    figure.tight_layout()
    return _save(figure, path)


def plot_diatomics(results: Sequence[DiatomicResult], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGSIZE)
    depth = 0.0
    for result in results:
        relative = result.energies - result.energies[-1]
        depth = max(depth, -float(relative.min()))
        axes.plot(result.distances, relative, label="–".join(chemical_symbols[z] for z in result.numbers))
    axes.axhline(0, color="grey", lw=0.5)
    # The repulsive wall rises to hundreds of eV; the well is what one reads.
    axes.set(xlabel="distance (Å)", ylabel="energy relative to the farthest point (eV)",
             ylim=(-1.2 * depth - 0.1, max(2.0, depth)), title="diatomic curves")
    axes.legend(ncols=2, fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def write_plots(workflow: str, labelled: Sequence[tuple[str, object]], directory: Path) -> list[Path]:
    """The plots of ``workflow`` for (label, result) pairs (errors are skipped) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    per_structure = {"eos": (EOSResult, plot_eos), "phonons": (PhononResult, plot_phonons),
                     "elastic": (ElasticResult, plot_elastic)}
    if workflow == "diatomics":
        curves = [r for _, r in labelled if isinstance(r, DiatomicResult)]
        return [plot_diatomics(curves, directory / "diatomics.png")] if curves else []
    if workflow not in per_structure:
        return []
    kind, plot = per_structure[workflow]
    return [plot(result, label, directory / f"{workflow}_{k}_{_slug(label)}.png")
            for k, (label, result) in enumerate(labelled) if isinstance(result, kind)]
