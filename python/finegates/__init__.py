"""FineGates training layer: learnable row/column gates on the Linears of any model.

    model = finegates.sparsify(model, target_sparsity=0.4)
    engine = finegates.SparsityEngine(model, finegates.TrainOptions(), total_steps=500)   # any loop:
    loss = task_loss + engine.sparsity_term(); ...; optimizer.step(); engine.step()  # ... engine.finish()
    finegates.compression_report(model)
    finegates.save_compact(finegates.compact(model.eval()), "out/compact")   # smaller, same outputs
    model = finegates.load_compact("out/compact")                           # stock classes, no gates
"""

from fg_kernels import __version__  # one version for the package fg-kernels

from .compaction.compact import compact, make_portable
from .compaction.modules import GatheredLinear
from .gates import Gates
from .layers import GatedLinear, set_backend
from .compaction.layouts import AttentionLayout, BlockLayout, MLPLayout, register_layout, registered_layouts
from .loss import SparsitySchedule, sparsity_loss
from .pooling import use_mean_pooling
from .report import compression_report
from .compaction.serialize import load_compact, save_compact
from .config import FineGatesConfig, TrainOptions
from .engine import SparsityEngine
from .sparsify import dense_view, gated_layers, sparsify, sparsify_as, sparsify_record, trainable_parameters
from .state import load_trainable_state, trainable_state_dict

__all__ = [
    "Gates",
    "GatedLinear",
    "set_backend",
    "sparsify",
    "FineGatesConfig",
    "TrainOptions",
    "SparsityEngine",
    "sparsify_record",
    "sparsify_as",
    "dense_view",
    "sparsity_loss",
    "SparsitySchedule",
    "compression_report",
    "trainable_parameters",
    "gated_layers",
    "trainable_state_dict",
    "load_trainable_state",
    "compact",
    "make_portable",
    "GatheredLinear",
    "save_compact",
    "load_compact",
    "BlockLayout",
    "AttentionLayout",
    "MLPLayout",
    "register_layout",
    "registered_layouts",
    "use_mean_pooling",
]
