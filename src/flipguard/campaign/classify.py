"""Classify a campaign's executed faults after the fact under any criterion (the store keeps
raw outcomes, so a criterion can be changed without re-running anything).

>>> from flipguard.inject import Golden
>>> golden_of.__name__
'golden_of'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flipguard.campaign.planner import PlannedFault
from flipguard.campaign.store import CampaignStore, StoreError, store_path
from flipguard.inject import Golden, Outcome, parse_criterion

__all__ = ["classify_store", "golden_of", "open_store"]


def golden_of(store: CampaignStore) -> Golden:
    """The golden (fault-free) facts recorded in ``store`` by its first run."""
    data = store.get_meta("golden")
    if data is None:
        raise StoreError(f"{store.path}: no golden reference recorded (run the campaign first)")
    return Golden.from_dict(data)


def classify_store(store: CampaignStore, criterion: str) -> list[tuple[PlannedFault, str]]:
    """Executed faults of ``store`` with their class under ``criterion``."""
    crit = parse_criterion(criterion)
    golden = golden_of(store)
    return [(pf, crit.classify(Outcome.from_dict(d), golden)) for pf, d in store.results()]


def open_store(run_or_store: Any) -> tuple[CampaignStore, bool]:
    """``(store, opened_here)`` for a store, a store path, a run directory or an object with
    a ``path``; the caller closes the store when ``opened_here``."""
    if isinstance(run_or_store, CampaignStore):
        return run_or_store, False
    path = getattr(run_or_store, "path", run_or_store)
    return CampaignStore(store_path(Path(path))), True
