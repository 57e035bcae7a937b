"""Statistical fault-injection campaigns: plan, store, run (local / workers / Ray), analyse.

>>> from flipguard.campaign import PlanConfig, cfr_table, leveugle_n
>>> leveugle_n(10**9, 0.01, 0.99)
16587

See docs/campaigns.md.
"""

from flipguard.campaign.analysis import cfr_rows, cfr_table, classify_store, parse_by
from flipguard.campaign.plan_types import SAMPLING_TYPES, Sampling, sampling_type
from flipguard.campaign.planner import (
    FAULT_MODELS,
    STRATA,
    Plan,
    PlanConfig,
    PlannedFault,
    PlannedStratum,
    data_aware_p,
    draw_faults,
    make_plan,
)
from flipguard.campaign.refine import refine_uniform, top_up
from flipguard.campaign.runner import (
    chunks_of,
    ensure_golden,
    first_faults,
    open_campaign,
    probe_rate,
    refine,
    run_campaign,
)
from flipguard.campaign.stats import (
    Estimate,
    allocate,
    clopper_pearson,
    interval,
    leveugle_n,
    post_hoc_margin,
    stratified,
    t_value,
    wilson,
)
from flipguard.campaign.store import CampaignStore, StoreError, export, store_path

__all__ = [
    "FAULT_MODELS", "STRATA", "Plan", "PlanConfig", "PlannedFault", "PlannedStratum",
    "data_aware_p", "draw_faults", "make_plan", "top_up", "refine_uniform",
    "SAMPLING_TYPES", "Sampling", "sampling_type",
    "CampaignStore", "StoreError", "export", "store_path",
    "chunks_of", "first_faults", "ensure_golden", "open_campaign",
    "probe_rate", "refine", "run_campaign",
    "Estimate", "allocate", "clopper_pearson", "interval", "leveugle_n", "post_hoc_margin",
    "stratified", "t_value", "wilson",
    "cfr_rows", "cfr_table", "classify_store", "parse_by",
]
