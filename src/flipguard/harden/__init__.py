"""Selective hardening under a memory budget, proven by paired re-injection.

* :mod:`~flipguard.harden.ecc` — SEC-DED (extended Hamming) code, vectorised;
* :mod:`~flipguard.harden.mechanisms` — TMR, parity, ECC, range restriction and invariant
  forcing modelled exactly in the fault path (``ReadPath.deliver``) with costs in bits;
* :mod:`~flipguard.harden.planner` — which protections, greedy or exact, under a budget;
* :mod:`~flipguard.harden.paired` — the same faults re-run with the protections active;
* :mod:`~flipguard.harden.module` — deployable model with Ranger-style activation clamps.

>>> import torch
>>> from flipguard.harden import Protection, ReadPath
>>> path = ReadPath.build([Protection("tmr", "fc", bits=(30,))], 1)
>>> path.deliver(torch.tensor([0x3F800000]), 1 << 30, "flip")[0].item() == 0x3F800000
True

See docs/hardening.md.
"""

from flipguard.harden.ecc import SecDed
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
    build_hardened,
    clamp_activation,
    harden_model,
    measure_input_bounds,
    save_hardened_run,
)
from flipguard.harden.paired import (
    RESULT_FILE,
    HardeningError,
    PairedResult,
    campaign_engines,
    check_fault_free,
    deliver_faults,
    harden_run,
    paired_bootstrap,
    paired_reinjection,
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
    "SecDed", "POLICIES", "SCHEMES", "STATUS_NAMES", "Protection", "ReadPath", "constant_bits",
    "parse_schemes", "build_hardened", "clamp_activation", "harden_model",
    "measure_input_bounds", "save_hardened_run", "RESULT_FILE", "HardeningError",
    "PairedResult", "campaign_engines", "check_fault_free", "deliver_faults", "harden_run",
    "paired_bootstrap", "paired_reinjection", "Candidate", "HardeningPlan", "candidates",
    "improvement_curve", "plan_hardening", "select", "weight_bits",
]
