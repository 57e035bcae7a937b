"""Resiliency Accuracy (RA): accuracy of a network *given that* a transient fault happened,
with hardware-aware fault probabilities.

``RA = sum_site P(site) * Acc(model with that fault)``, ``P`` from an exposure model
(``uniform`` | ``memory`` | ``systolic[:FILE]``), estimated by Monte Carlo or importance
sampling with sequential stopping and a confidence-sequence interval that stays valid
under it (:mod:`flipguard.ra.confseq`); samples persist in ``RUN/ra.sqlite``. See
docs/resiliency-accuracy.md.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> p = build_exposure(net, torch.zeros(1, 4), "systolic", targets=("weight",))
>>> sorted(p.shares())
['weight']
"""

from flipguard.ra.adaptive import AdaptiveMixture, AdaptiveProposal
from flipguard.ra.confseq import INTERVALS, BettingCS, EmpiricalBernsteinCS, make_cs
from flipguard.ra.distribution import Block, Distribution, Mixture, SiteDistribution, Sites, Term
from flipguard.ra.estimators import (
    EngineEvaluator,
    Estimate,
    estimate_ra,
    exhaustive,
    reweight,
    summarise,
    weight_bound_of,
)
from flipguard.ra.exposure import (
    GEMM_TYPES,
    HardwareModel,
    Layer,
    LayerGraph,
    MemoryModel,
    UniformModel,
    analyse,
    build_exposure,
    parse_hardware,
)
from flipguard.ra.proposal import (
    PROPOSALS,
    BitFieldProposal,
    GradientProposal,
    PilotProposal,
    Proposal,
    ProposalContext,
    SiteWeightProposal,
    bit_sensitivity,
    defensive,
    make_proposal,
    register_proposal,
)
from flipguard.ra.resiliency import (
    RAConfig,
    resiliency_accuracy,
    result_dict,
    reweighted_accuracy,
    stream_key,
)
from flipguard.ra.store import STORE_FILE, CachedEvaluator, RAStore, RAStoreError
from flipguard.ra.structures import SiteExposure
from flipguard.ra.systolic import SystolicConfig, SystolicModel, load_systolic
from flipguard.ra.weights import cell_ratios, max_ratio

__all__ = [
    "Block", "Distribution", "Mixture", "SiteDistribution", "Sites", "Term",
    "EngineEvaluator", "Estimate", "RAConfig", "estimate_ra", "exhaustive",
    "resiliency_accuracy", "result_dict", "reweight", "reweighted_accuracy", "stream_key",
    "summarise",
    "weight_bound_of", "INTERVALS", "BettingCS", "EmpiricalBernsteinCS", "make_cs",
    "cell_ratios", "max_ratio",
    "GEMM_TYPES", "HardwareModel", "Layer", "LayerGraph", "MemoryModel", "UniformModel",
    "analyse", "build_exposure", "parse_hardware",
    "PROPOSALS", "AdaptiveMixture", "AdaptiveProposal", "BitFieldProposal",
    "GradientProposal", "PilotProposal", "Proposal",
    "ProposalContext", "SiteWeightProposal", "bit_sensitivity", "defensive", "make_proposal",
    "register_proposal",
    "STORE_FILE", "CachedEvaluator", "RAStore", "RAStoreError",
    "SiteExposure", "SystolicConfig", "SystolicModel", "load_systolic",
]
