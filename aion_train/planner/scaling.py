"""Compute-optimal model size and token count from published scaling laws.

Training compute is taken as C = 6 N D (N parameters, D tokens; Kaplan et al. 2020, sec. 2.1).

* Chinchilla approach 3 (Hoffmann et al. 2022, eq. 2 and 4): the parametric loss
  L(N, D) = E + A / N^alpha + B / D^beta with the constants printed in the paper, minimised
  under C = 6 N D:  N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, a = beta/(alpha+beta),
  b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)).
  Caveat: with the rounded constants printed in the paper this fit gives ~50 tokens per
  parameter at 1e21 FLOPs and ~90 at Chinchilla's own budget, i.e. smaller models than the
  paper's approaches 1 and 2 and its Table 3 (Besiroglu et al. 2024, "Chinchilla Scaling: A
  replication attempt", trace this to the rounding and to an unconverged fit). So the planner
  also reports:
* the approach 1/2 rule of ~20 tokens per parameter: D = 20 N, so N = sqrt(C / 120);
* a log-log interpolation of the paper's Table 3 (approach 1 frontier).
* Kaplan et al. 2020: L(C_min) = (C_c / C)^alpha_C with C in PF-days (C_c = 3.1e8,
  alpha_C = 0.050) and L(N) = (N_c / N)^0.076 (N_c = 8.8e13 non-embedding parameters).
  Kaplan's losses are in nats on WebText2 with the GPT-2 tokenizer and Chinchilla's on
  MassiveText: the two numbers are not comparable with each other or with this platform's loss.
"""

from __future__ import annotations

import math

# Hoffmann et al. (2022), eq. 10 (approach 3)
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
# Hoffmann et al. (2022), Table 3: (parameters, FLOPs, tokens) on the approach 1 frontier
CHINCHILLA_TABLE3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]
TOKENS_PER_PARAM = 20.0
# Kaplan et al. (2020): eq. 1.3 (L(C_min)) and eq. 1.1 (L(N))
KAPLAN = {"C_c_pf_days": 3.1e8, "alpha_C": 0.050, "N_c": 8.8e13, "alpha_N": 0.076}
PF_DAY = 1e15 * 86400  # 8.64e19 FLOPs


def chinchilla_loss(n: float, d: float, c: dict = CHINCHILLA) -> float:
    return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]


def chinchilla_optimal(flops: float, c: dict = CHINCHILLA) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = flops."""
    al, be = c["alpha"], c["beta"]
    a, b = be / (al + be), al / (al + be)
    g = (al * c["A"] / (be * c["B"])) ** (1.0 / (al + be))
    return g * (flops / 6.0) ** a, (flops / 6.0) ** b / g


def rule_of_20(flops: float, ratio: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """D = ratio * N and C = 6 N D  ->  N = sqrt(C / (6 ratio))."""
    n = math.sqrt(flops / (6.0 * ratio))
    return n, ratio * n


def table3_frontier(flops: float) -> tuple[float, float]:
    """(N, D) interpolated log-linearly in FLOPs along Table 3 (extrapolated past its ends)."""
    rows = CHINCHILLA_TABLE3
    lc = math.log(flops)
    i = 0
    while i < len(rows) - 2 and lc > math.log(rows[i + 1][1]):
        i += 1
    (n0, c0, d0), (n1, c1, d1) = rows[i], rows[i + 1]
    f = (lc - math.log(c0)) / (math.log(c1) - math.log(c0))
    return (
        math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))),
        math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0))),
    )


def kaplan_loss_compute(flops: float) -> float:
    return (KAPLAN["C_c_pf_days"] / (flops / PF_DAY)) ** KAPLAN["alpha_C"]


def kaplan_loss_params(n: float) -> float:
    return (KAPLAN["N_c"] / n) ** KAPLAN["alpha_N"]


def plan_compute(flops: float) -> dict:
    if not flops > 0 or math.isinf(flops):
        raise ValueError(f"--flops must be a positive number, got {flops}")
    n, d = chinchilla_optimal(flops)
    rn, rd = rule_of_20(flops)
    tn, td = table3_frontier(flops)
    return {
        "flops": flops,
        "pf_days": flops / PF_DAY,
        "params_opt": rn,  # the published compute-optimal frontier (approaches 1-2)
        "tokens_opt": rd,
        "tokens_per_param": rd / rn,
        "chinchilla_loss": chinchilla_loss(rn, rd),
        "kaplan_loss": kaplan_loss_compute(flops),  # L(C_min), nats, WebText2
        "kaplan_loss_at_params_opt": kaplan_loss_params(rn),  # L(N) at N_opt
        "rule_20x": {"params": rn, "tokens": rd, "chinchilla_loss": chinchilla_loss(rn, rd)},
        "table3": {"params": tn, "tokens": td},
        "approach3": {"params": n, "tokens": d, "tokens_per_param": d / n, "chinchilla_loss": chinchilla_loss(n, d)},
        "notes": (
            "params_opt/tokens_opt: the approach 1-2 frontier of Hoffmann et al. 2022 (~20 tokens per "
            "parameter, tracks its Table 3); approach3: the parametric fit with its printed constants, "
            "which favours smaller models (the discrepancy Besiroglu et al. 2024 report)"
        ),
    }
