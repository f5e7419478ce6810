"""D3 damping parameters by functional (no torch: the front door validates requests against them)."""

from __future__ import annotations

# Damping parameters from s-dftd3 (parameters.toml): BJ (a1, s8, a2) from Grimme, Ehrlich, Goerigk,
# J. Comput. Chem. 32, 1456 (2011) (r²SCAN: Ehlert et al., J. Chem. Phys. 154, 061101 (2021));
# zero damping (rs6, s8) from Grimme et al., J. Chem. Phys. 132, 154104 (2010); s6 = 1, rs8 = 1,
# alp = 14 throughout.
BJ = {
    "pbe": (0.4289, 0.7875, 4.4407),
    "pbe0": (0.4145, 1.2177, 4.8593),
    "b3lyp": (0.3981, 1.9889, 4.4211),
    "r2scan": (0.49484001, 0.78981345, 5.73083694),
    "tpss": (0.4535, 1.9435, 4.4752),
    "revpbe": (0.5238, 2.3550, 3.5016),
    "rpbe": (0.1820, 0.8318, 4.0094),
    "pbesol": (0.4466, 2.9491, 6.1742),
    "blyp": (0.4298, 2.6996, 4.2359),
    "bp": (0.3946, 3.2822, 4.8516),
}
ZERO = {
    "pbe": (1.217, 0.722),
    "pbe0": (1.287, 0.928),
    "b3lyp": (1.261, 1.703),
    "tpss": (1.166, 1.105),
    "revpbe": (0.923, 1.010),
    "rpbe": (0.872, 0.514),
    "pbesol": (1.345, 0.612),
    "blyp": (1.094, 1.682),
    "bp": (1.139, 1.683),
}
DAMPINGS = {"bj": BJ, "zero": ZERO}


def damping_parameters(functional: str, damping: str) -> dict[str, float]:
    """torch-dftd's parameter dict (s6, rs6, s18, rs18, alp) for a functional and damping."""
    table = DAMPINGS.get(damping)
    if table is None:
        raise ValueError(f"unknown D3 damping {damping!r}; known: {', '.join(DAMPINGS)}")
    if functional not in table:
        raise ValueError(f"no D3({damping}) parameters for {functional!r}; known: {', '.join(sorted(table))}")
    if damping == "bj":
        a1, s8, a2 = table[functional]
        return {"s6": 1.0, "rs6": a1, "s18": s8, "rs18": a2, "alp": 14.0}
    rs6, s8 = table[functional]
    return {"s6": 1.0, "rs6": rs6, "s18": s8, "rs18": 1.0, "alp": 14.0}
