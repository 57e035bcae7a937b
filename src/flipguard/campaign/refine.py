"""Iterative refinement of uniform plans: top strata up to the planned margin with the
critical rate observed so far (Ruospo et al.'s iterative SFI, one round at a time).

>>> from flipguard.campaign.refine import top_up
>>> top_up.__name__
'top_up'
"""

from __future__ import annotations

import torch

from flipguard.campaign.classify import classify_store
from flipguard.campaign.planner import P_FLOOR, Plan, PlanConfig, PlannedFault, make_plan
from flipguard.campaign.sampling import draw_faults
from flipguard.campaign.store import CampaignStore
from flipguard.inject import CRITICAL

__all__ = ["refine_uniform", "top_up"]


def refine_uniform(store: CampaignStore, model: torch.nn.Module, criterion: str,
                   max_rounds: int = 3) -> int:
    """One refinement round of a uniform plan (iterative SFI): re-estimate each stratum's
    ``p`` from the executed faults under ``criterion`` and append the missing faults to reach
    the planned margin (at most ``max_rounds`` rounds)."""
    config = PlanConfig.from_dict(store.definition["plan"])
    plan: Plan = make_plan(model, config)
    rounds = int(store.get_meta("rounds", 0))
    if rounds >= max_rounds:
        return 0
    observed: dict[str, list[int]] = {}
    for pf, cls in classify_store(store, criterion):
        n_k = observed.setdefault(pf.stratum, [0, 0])
        n_k[0] += 1
        n_k[1] += cls in CRITICAL
    new, _ = top_up(plan, {k: (v[0], v[1]) for k, v in observed.items()}, store.done_ks(),
                    rounds + 1, store.next_fault_id())
    if new:  # the new faults and the round counter commit together
        store.add_planned(new, meta={"rounds": rounds + 1})
    return len(new)


def top_up(plan: Plan, observed: dict[str, tuple[int, int]], done_k: dict[str, list[int]],
           round_: int, start_id: int) -> tuple[list[PlannedFault], dict[str, int]]:
    """One refinement round: re-estimate each stratum's ``p`` from ``observed[key] = (n, k)``
    (clamped to [P_FLOOR, 1 - P_FLOOR]), recompute its Leveugle size and draw the missing
    faults (new ones only, never those in ``done_k``). Returns the new faults and new sizes."""
    cfg = plan.config
    new: list[PlannedFault] = []
    sizes: dict[str, int] = {}
    for s in plan.strata:
        n_obs, k_obs = observed.get(s.key, (0, 0))
        have = len(done_k.get(s.key, ()))
        p_hat = min(max(k_obs / n_obs if n_obs else 0.5, P_FLOOR), 1 - P_FLOOR)
        target = cfg.sample_size(s.N, p_hat)
        sizes[s.key] = max(target, have)
        if target > have:
            drawn = draw_faults(plan.space, s, target - have, cfg.seed, cfg.kinds, round_,
                                done_k.get(s.key, ()))
            new += [PlannedFault(start_id + len(new) + i, s.key, k, f, kern, round_)
                    for i, (k, f, kern) in enumerate(drawn)]
    return new, sizes
