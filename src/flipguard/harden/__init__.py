"""Selective hardening under a memory budget, proven by paired re-injection.

* :mod:`~flipguard.harden.ecc` — SEC-DED (extended Hamming) code, vectorised;
* :mod:`~flipguard.harden.mechanisms` — TMR, parity, ECC, range restriction and invariant
  forcing modelled exactly in the fault path (``ReadPath.deliver``) with costs in bits;
* :mod:`~flipguard.harden.planner` — which protections, greedy or exact, under a budget;
* :mod:`~flipguard.harden.coverage` — fault locations each scheme covers, read-path cost;
* :mod:`~flipguard.harden.costs` — what the protections in use cover and cost;
* :mod:`~flipguard.harden.paired` — the same faults re-run with the protections active;
* :mod:`~flipguard.harden.pairstats` — weighted paired test and interval of the improvement;
* :mod:`~flipguard.harden.exposure` — the improvement over a hardware exposure model;
* :mod:`~flipguard.harden.module` — deployable model with Ranger-style activation clamps.

Everything here takes plain objects (a model, a campaign store, an engine builder);
``flipguard harden RUN`` on a run directory is :mod:`flipguard.study.hardening`.

>>> import torch
>>> from flipguard.harden import Protection, ReadPath
>>> path = ReadPath.build([Protection("tmr", "fc", bits=(30,))], 1)
>>> path.deliver(torch.tensor([0x3F800000]), 1 << 30, "flip")[0].item() == 0x3F800000
True

See docs/hardening.md.
"""

from flipguard.harden.costs import coverage_summary
from flipguard.harden.coverage import COVERAGE, LOCATIONS, Coverage
from flipguard.harden.ecc import SecDed
from flipguard.harden.exposure import exposure_cfr, paired_exposure, split_exposure
from flipguard.harden.mechanisms import (
    POLICIES,
    SCHEMES,
    STATUS_NAMES,
    Protection,
    ReadPath,
    constant_bits,
    parse_schemes,
)
from flipguard.harden.module import (
    attach_clamps,
    clamp_activation,
    clamped_layers,
    default_clamp_layers,
    harden_model,
    measure_input_bounds,
    open_clamps,
)
from flipguard.harden.paired import (
    HardeningError,
    PairedResult,
    check_fault_free,
    deliver_faults,
    paired_bootstrap,
    paired_reinjection,
)
from flipguard.harden.pairstats import (
    PairCell,
    PairedComparison,
    compare_paired,
    improvement_interval,
    pair_cells,
    sign_flip_test,
)
from flipguard.harden.planner import (
    Candidate,
    HardeningPlan,
    candidates,
    improvement_curve,
    plan_hardening,
    select,
    weight_bits,
)

__all__ = [
    "COVERAGE", "LOCATIONS", "Coverage", "exposure_cfr", "paired_exposure", "split_exposure",
    "PairCell", "PairedComparison", "compare_paired", "improvement_interval", "pair_cells",
    "sign_flip_test", "coverage_summary", "SecDed", "POLICIES", "SCHEMES", "STATUS_NAMES",
    "Protection", "ReadPath", "constant_bits", "parse_schemes", "attach_clamps",
    "clamp_activation", "clamped_layers", "default_clamp_layers", "harden_model",
    "measure_input_bounds", "open_clamps", "HardeningError", "PairedResult",
    "check_fault_free", "deliver_faults", "paired_bootstrap", "paired_reinjection",
    "Candidate", "HardeningPlan", "candidates", "improvement_curve", "plan_hardening",
    "select", "weight_bits",
]
