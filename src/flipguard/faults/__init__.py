"""Fault models for hardware bit flips: number formats, fault sites, fault kinds.

>>> import torch
>>> from flipguard.faults import Fault, apply_fault, get_format
>>> apply_fault(torch.tensor(1.0), Fault("weight", "fc", 0, (31,)), get_format("fp32")).item()
-1.0
"""

from flipguard.faults.formats import (
    FORMAT_NAMES,
    FloatFormat,
    Int8Format,
    NumberFormat,
    bits_mask,
    clear_bits,
    flip_bits,
    get_format,
    set_bits,
)
from flipguard.faults.models import (
    KINDS,
    Fault,
    apply_bits,
    apply_fault,
    fault_from_dict,
    fault_to_dict,
    is_noop,
    mbu,
    noop_mask,
)
from flipguard.faults.sites import (
    DEFAULT_LAYER_TYPES,
    TARGETS,
    FaultSite,
    LayerSpace,
    SiteSpace,
    Stratum,
    coords_of,
    index_of,
    kernel_ids,
    kernel_of,
)

__all__ = [
    "FORMAT_NAMES", "FloatFormat", "Int8Format", "NumberFormat", "bits_mask", "clear_bits",
    "flip_bits", "get_format", "set_bits",
    "KINDS", "Fault", "apply_bits", "apply_fault", "fault_from_dict", "fault_to_dict",
    "is_noop", "mbu", "noop_mask",
    "DEFAULT_LAYER_TYPES", "TARGETS", "FaultSite", "LayerSpace", "SiteSpace", "Stratum",
    "coords_of", "index_of", "kernel_ids", "kernel_of",
]
