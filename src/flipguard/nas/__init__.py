"""Resilience-aware architecture search (``flipguard nas``): search spaces, objectives
without test labels (validation quality, RA under an exposure model, memory, MACs), Pareto
bookkeeping and the Optuna search driver. See docs/nas.md.

>>> from flipguard.nas import CAESpace, pareto_front
>>> CAESpace().name
'cae'
>>> pareto_front([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], ["maximize", "maximize"]).tolist()
[0, 1]
"""

from flipguard.nas.activations import ACTIVATIONS, ClipAct, LearnedClip, Ranger, profile_bounds
from flipguard.nas.cae_space import CAESpace, NASAutoencoder
from flipguard.nas.config import NASConfig
from flipguard.nas.cost import count_macs, count_parameters, memory_bits
from flipguard.nas.data import SearchData, classification_data, detection_data
from flipguard.nas.objectives import Fidelity, Settings, evaluate_network
from flipguard.nas.pareto import dominates, nondominated_ranks, pareto_front
from flipguard.nas.pipeline import run_nas
from flipguard.nas.space import Param, SearchSpace, arch_key, load_space

__all__ = [
    "ACTIVATIONS", "CAESpace", "ClipAct", "Fidelity", "LearnedClip", "NASAutoencoder",
    "NASConfig", "Param", "Ranger", "SearchData", "SearchSpace", "Settings", "arch_key",
    "classification_data", "count_macs", "count_parameters", "detection_data", "dominates",
    "evaluate_network", "load_space", "memory_bits", "nondominated_ranks", "pareto_front",
    "profile_bounds", "run_nas",
]
