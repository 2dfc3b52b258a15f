"""How far the finite-n value SGLD targets sits from the asymptotic learning
coefficient, for K(a, b) = a^2 b^(2k) at a = b = 0, by 2-D quadrature
(llcfast.estimate.quadrature). Prints the README's table.

    python benchmarks/finite_n_gap.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from llcfast.estimate.quadrature import localized_llc_2d  # noqa: E402

NBETAS = (1e2, 1e3, 1e4, 1e5, 1e6, 1e8)
MODELS = (("a^2 b^2 (f = a b x)", 1, 0.5), ("a^2 b^4 (f = a b^2 x)", 2, 0.25))


def main(gamma: float = 1.0):
    print(f"| K, gamma = {gamma:g} | asymptotic | " + " | ".join(f"nbeta = {nb:.0e}" for nb in NBETAS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in NBETAS) + " |")
    for label, k, lam in MODELS:
        values = [localized_llc_2d(lambda a, b: a ** 2 * b ** (2 * k), (0.0, 0.0), nbeta=nb, gamma=gamma,
                                   points=4001, stretch=10.0) for nb in NBETAS]
        print(f"| {label} | {lam:g} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
