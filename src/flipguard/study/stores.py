"""The campaign store of a run directory, checked against the run as it is now.

A later stage (hardening, the report) reads ``RUN/campaign.sqlite``. The store records the
fingerprints of the model, the evaluated data and the task (threshold, scorer, number format)
it was made for; when the run changed since (retrained model, new threshold, other data),
its outcomes describe another detector and must not be used as this one's.

>>> f = campaign_factory("runs/demo", {"engine": {"images": 8}, "plan": {"fmt": "fp16"}})
>>> f.run, f.images, f.fmt, f.certify
('runs/demo', 8, 'fp16', False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flipguard.campaign import CampaignStore, StoreError
from flipguard.errors import FlipguardError
from flipguard.study.engines import RunEngineFactory
from flipguard.study.rundir import CONFIG_FILE, load_run

__all__ = ["campaign_factory", "check_campaign", "check_run_store", "fingerprints_or_none",
           "mismatch"]

_FRESH = "; use --fresh to start over"


def campaign_factory(run: str | Path, store: CampaignStore | dict[str, Any]) -> RunEngineFactory:
    """The engine recipe of ``run`` that the campaign in ``store`` (or its definition dict)
    evaluated: the same images, number format and data directory."""
    d = store.definition if isinstance(store, CampaignStore) else store
    eng = d.get("engine") or {}
    fmt = (d.get("plan") or {}).get("fmt", eng.get("fmt", "fp32"))
    return RunEngineFactory(str(run), images=eng.get("images"), fmt=fmt,
                            data_dir=eng.get("data_dir"))


def mismatch(store: CampaignStore, fingerprints: dict[str, str]) -> str | None:
    """One line saying why ``store`` was made for another model, dataset or task than
    ``fingerprints`` describe (None when it was not)."""
    try:
        store.check(**fingerprints)
    except StoreError as exc:
        return str(exc).removesuffix(_FRESH)
    return None


def check_campaign(store: CampaignStore, factory: RunEngineFactory, fix: str) -> None:
    """Raise :class:`~flipguard.campaign.StoreError` (one line ending in ``fix``) when
    ``store`` was made for another model, dataset or task than ``factory``'s engine."""
    why = mismatch(store, factory.fingerprints())
    if why is not None:
        raise StoreError(f"{why}; {fix}")


def fingerprints_or_none(factory: RunEngineFactory) -> dict[str, str] | None:
    """``factory.fingerprints()``, or None when the run's data cannot be loaded (then only
    the model can be compared)."""
    try:
        return factory.fingerprints()
    except (FlipguardError, OSError):
        return None


def check_run_store(run: str | Path, store: CampaignStore,
                    fix: str = "re-run `flipguard campaign run RUN --fresh`") -> None:
    """When ``run`` is a run directory, raise :class:`~flipguard.campaign.StoreError` if
    ``store`` was made for another model, dataset or task than the run as it is now (its
    model only, when the data are gone). A bare store path is not checked. Opening the run
    obeys the trust rule of :func:`flipguard.study.rundir.check_trusted`."""
    if not (Path(run).is_dir() and (Path(run) / CONFIG_FILE).is_file()):
        return
    fps = fingerprints_or_none(campaign_factory(run, store)) or \
        {"model": load_run(run).model_fingerprint()}
    why = mismatch(store, fps)
    if why is not None:
        raise StoreError(f"{why}; {fix}")
