"""Rappé & Goddard's QEq parameters (J. Phys. Chem. 95, 3358 (1991)) and the ns Slater orbitals they
imply: each element's valence shell n and exponent ζ = λ (2n + 1) / (2R), from its QEq radius R."""

# (χ, J, R): electronegativity χ (eV), idempotential J = 2η (eV) and QEq radius R (Å).
# Rappé & Goddard, J. Phys. Chem. 95, 3358 (1991), Table I; the same values, with those the 1991
# table lacks, are UFF's "Xi", 2 × "Hard" and "Radius" (Rappé et al., J. Am. Chem. Soc. 114, 10024
# (1992), Table 1), as Open Babel's and RDKit's UFF.prm list them.
RAPPE_GODDARD: dict[int, tuple[float, float, float]] = {
    1: (4.528, 13.890, 0.371),  # H
    3: (3.006, 4.772, 1.557),  # Li
    4: (4.877, 8.886, 1.240),  # Be
    5: (5.110, 9.500, 0.822),  # B
    6: (5.343, 10.126, 0.759),  # C
    7: (6.899, 11.760, 0.715),  # N
    8: (8.741, 13.364, 0.669),  # O
    9: (10.874, 14.948, 0.706),  # F
    11: (2.843, 4.592, 2.085),  # Na
    12: (3.951, 7.386, 1.500),  # Mg
    13: (4.060, 7.180, 1.201),  # Al
    14: (4.168, 6.974, 1.176),  # Si
    15: (5.463, 8.000, 1.102),  # P
    16: (6.928, 8.972, 1.047),  # S
    17: (8.564, 9.892, 0.994),  # Cl
    19: (2.421, 3.840, 2.586),  # K
    20: (3.231, 5.760, 2.000),  # Ca
    21: (3.395, 6.160, 1.750),  # Sc
    22: (3.470, 6.760, 1.607),  # Ti
    23: (3.650, 6.820, 1.470),  # V
    24: (3.415, 7.730, 1.402),  # Cr
    25: (3.325, 8.210, 1.533),  # Mn
    26: (3.760, 8.280, 1.393),  # Fe
    27: (4.105, 8.350, 1.406),  # Co
    28: (4.465, 8.410, 1.398),  # Ni
    29: (4.200, 8.440, 1.434),  # Cu
    30: (5.106, 8.570, 1.400),  # Zn
    31: (3.641, 6.320, 1.211),  # Ga
    32: (4.051, 6.876, 1.189),  # Ge
    33: (5.188, 7.618, 1.204),  # As
    34: (6.428, 8.262, 1.224),  # Se
    35: (7.790, 8.850, 1.141),  # Br
    37: (2.331, 3.692, 2.770),  # Rb
    38: (3.024, 4.880, 2.415),  # Sr
    39: (3.830, 5.620, 1.998),  # Y
    40: (3.400, 7.100, 1.758),  # Zr
    41: (3.550, 6.760, 1.603),  # Nb
    42: (3.465, 7.510, 1.530),  # Mo
    46: (4.320, 8.000, 1.544),  # Pd
    47: (4.436, 6.268, 1.622),  # Ag
    48: (5.034, 7.914, 1.600),  # Cd
    49: (3.506, 5.792, 1.404),  # In
    50: (3.987, 6.248, 1.354),  # Sn
    51: (4.899, 6.684, 1.404),  # Sb
    52: (5.816, 7.052, 1.380),  # Te
    53: (6.822, 7.524, 1.333),  # I
    55: (2.183, 3.422, 2.984),  # Cs
    56: (2.814, 4.792, 2.442),  # Ba
    72: (3.700, 6.800, 1.759),  # Hf
    73: (5.100, 5.700, 1.605),  # Ta
    74: (4.630, 6.620, 1.538),  # W
    78: (4.790, 8.860, 1.557),  # Pt
    79: (4.894, 5.172, 1.618),  # Au
    82: (3.900, 7.060, 1.444),  # Pb
    83: (4.690, 7.480, 1.514),  # Bi
}
# Rappé & Goddard's scale of the Slater exponents, ζ = λ (2n + 1) / (2R).
SLATER_LAMBDA = 0.4913


def principal_quantum_number(z: int) -> int:
    """n of the valence s shell: 1 for H-He, 2 for Li-Ne, ..., 7 from Fr."""
    return 1 + sum(z > last for last in (2, 10, 18, 36, 54, 86))


def slater_exponent(z: int) -> float:
    """ζ (1/Å) of element z's ns Slater orbital: λ (2n + 1) / (2R), from its QEq radius R."""
    return SLATER_LAMBDA * (2 * principal_quantum_number(z) + 1) / (2.0 * RAPPE_GODDARD[z][2])

