"""The user-facing entry points: quantize, calibrate, fold_weight, postprocess_amax (and ModelOpt's helpers)."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quant_core.batch_order import BatchOrderGuard
from quant_core.config.schema import parse_config
from quant_core.config.unmatched import check_parent_classes
from quant_core.conversion import (
    QuantCfgEntry,
    iter_quantizers,
    iter_tensor_quantizers,
    replace_quant_modules,
    set_quantizer_by_cfg,
)
from quant_core.deployable import make_deployable
from quant_core.input_groups import (
    InputRecorder,
    forward_dummy,
    has_record,
    recording_input_groups,
)
from quant_core.layerwise import find_decoder_layers, layerwise_calibrate
from quant_core.model_tools import (  # noqa: F401 re-exported: ModelOpt's model_quant names
    compute_quantization_mse,
    eval_mode,
    fold_weight,
    model_loop,
    temporarily_fold_weights,
)
from quant_core.nn.registry import QuantModuleRegistry
from quant_core.nn.rotation import check_paired_key_rotation
from quant_core.nn.tensor_quantizer import TensorQuantizer
from quant_core.offload import weights_materialized
from quant_core.plugins import prepare_model
from quant_core.preflight import (
    AlgorithmRun,
    check_algorithms,
    check_kv_cache_reached,
    check_materialized,
    check_not_compressed,
    check_ranks_agree,
)

ForwardLoop = Callable[[nn.Module], Any]


class CalibrationError(RuntimeError):
    """The user's forward_loop failed (or never ran the model) during calibration."""


def quantize(
    model: nn.Module, config: dict[str, Any], forward_loop: ForwardLoop | None = None
) -> nn.Module:
    """Convert ``model``'s registered modules in place, apply ``config``'s ``quant_cfg`` and calibrate.

    ``forward_loop(model)`` runs the calibration batches through the model; it may be None for
    configs that need no activation statistics (weight-only or dynamic formats).
    """
    runs = prepare_quantization(model, config)
    _calibrate(model, runs, _guard_order(runs, model_loop(forward_loop)))
    return model


def prepare_quantization(
    model: nn.Module, config: dict[str, Any], *, materialized: bool = True
) -> list[AlgorithmRun]:
    """:func:`quantize` up to calibration: check ``config``, insert and configure the quantizers.

    Returns the checked algorithms to run. ``materialized=False`` accepts weights on the ``meta``
    device (a model whose layers are loaded one at a time, :mod:`quant_core.streamed`).
    """
    check_not_compressed(model, "quantize")
    cfg, entries = parse_config(config)
    check_parent_classes(entries)
    runs = check_algorithms(cfg.algorithm)
    if _syncs(runs):
        check_ranks_agree(model, config, "quantize")
    if materialized:
        check_materialized(model)
    prepare_model(model)
    replace_quant_modules(model)
    if next(iter_quantizers(model), None) is None:
        registered = ", ".join(
            sorted(QuantModuleRegistry.get_key(c) for c in QuantModuleRegistry.originals())
        )
        raise ValueError(
            f"no quantizable module in {type(model).__name__}: none of its modules is of a registered "
            f"class ({registered}). Register one with mtq.register(original_cls=..., quantized_cls=...)."
        )
    set_quantizer_by_cfg(model, entries)
    check_kv_cache_reached(model, entries)
    check_paired_key_rotation(model)
    if not any(q.is_enabled for _n, q, _p in iter_quantizers(model)):
        warnings.warn(
            f"config enabled no quantizer in {type(model).__name__}", RuntimeWarning, stacklevel=3
        )
    return runs


def _guard_order(runs: list[AlgorithmRun], forward_loop: ForwardLoop | None) -> ForwardLoop | None:
    """``forward_loop`` wrapped in a :class:`BatchOrderGuard` when an algorithm runs layer by layer."""
    if forward_loop is None or not any(run.layerwise.enable for run in runs):
        return forward_loop
    return BatchOrderGuard(forward_loop)


class _EmptyBatch(ValueError):
    """A calibration batch with zero elements (raised by the batch hook, reported by _LoopGuard)."""


def _check_batch(index: int, args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse a batch whose first tensor input has no elements, naming its index and shape."""
    first = next(
        (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None
    )
    if first is not None and first.numel() == 0:
        raise _EmptyBatch(
            f"calibration batch {index} (counting from 0) has zero size: its input has shape "
            f"{tuple(first.shape)}"
        )


class _LoopGuard:
    """Wraps forward_loop: counts batches (tqdm), checks the model ran, and names failures."""

    def __init__(self, model: nn.Module, forward_loop: ForwardLoop, method: str):
        self.model, self.forward_loop, self.method = model, forward_loop, method
        self.seen = 0

    def __call__(self, model: nn.Module) -> Any:
        quant_modules = list({id(p): p for _n, _q, p in iter_quantizers(model)}.values())
        if not quant_modules:  # a bare (Sequential)Quantizer or a container of quantizers only
            quant_modules = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
        bar = tqdm(desc=f"calibrating ({self.method})", unit="batch", leave=False)

        def on_module(_module: nn.Module, _args: Any) -> None:
            self.seen += 1

        batches = itertools.count()

        def on_batch(_module: nn.Module, args: Any, kwargs: Any) -> None:
            _check_batch(next(batches), args, kwargs)
            bar.update(1)  # a pre-hook must return None, or it replaces the inputs

        handles = [m.register_forward_pre_hook(on_module) for m in quant_modules]
        handles.append(model.register_forward_pre_hook(on_batch, with_kwargs=True))
        before = self.seen
        try:
            result = self.forward_loop(model)
        except _EmptyBatch as err:
            raise CalibrationError(
                f"{err} during '{self.method}' calibration. No statistics from this run were kept; "
                "drop empty batches from the calibration data (e.g. DataLoader(..., drop_last=True))."
            ) from None
        except Exception as err:
            raise CalibrationError(
                f"forward_loop raised {type(err).__name__} during '{self.method}' calibration: {err}. "
                "No statistics from this run were kept; the model is quantized but uncalibrated."
            ) from err
        finally:
            for h in handles:
                h.remove()
            bar.close()
        if self.seen == before:
            raise CalibrationError(
                "forward_loop(model) returned without running the model: no quantized module saw any "
                "data. It must call model(batch) on the calibration batches, e.g. "
                "`def forward_loop(m):\n    for batch in loader:\n        m(batch)`"
            )
        return result


def _reset_calibration_state(model: nn.Module) -> None:
    for _name, q in iter_tensor_quantizers(model):
        q.disable_calib()
        q.enable_quant()
        q.reset_statistics()


def calibrate(
    model: nn.Module, algorithm: Any = "max", forward_loop: ForwardLoop | None = None
) -> nn.Module:
    """Run calibration ``algorithm`` (a name, ``{"method": name, **options}``, None, or a list) on ``model``.

    Every algorithm and option is checked before the model is touched. Calibration runs with the
    model in eval mode (no Dropout, BatchNorm on its running statistics); each module's
    train/eval mode is restored afterwards. An algorithm's ``"layerwise"`` option calibrates one
    decoder layer at a time (see :mod:`quant_core.layerwise`). Weights offloaded by accelerate are
    loaded for the calibration (all of them at once, or one decoder layer's with ``layerwise``)
    and changed ones written back (see :mod:`quant_core.offload`).
    """
    check_not_compressed(model, "calibrate")
    runs = check_algorithms(algorithm)
    if _syncs(runs):
        check_ranks_agree(model, algorithm, "calibrate")
    return _calibrate(model, runs, _guard_order(runs, model_loop(forward_loop)))


def _syncs(runs: list[AlgorithmRun]) -> bool:
    """True unless every algorithm runs with ``distributed_sync: False`` (a rank calibrating alone
    must not wait in a collective for ranks that never come)."""
    return any(run.options.get("distributed_sync", True) for run in runs) or not runs


def _calibrate(
    model: nn.Module, runs: list[AlgorithmRun], forward_loop: ForwardLoop | None
) -> nn.Module:
    """`calibrate` with the algorithms already parsed and checked (`check_algorithms`).

    The forward passes of calibration record which layers read one input
    (:mod:`quant_core.input_groups`); at the end the model is made deployable
    (:func:`quant_core.deployable.make_deployable`), per decoder layer under ``layerwise``."""
    check_materialized(model)
    _refuse_four_over_six(model, [run.method for run in runs])
    with eval_mode(model):
        with recording_input_groups(model) as recorder:
            for run in runs:
                _run_algorithm(model, run, forward_loop, recorder)
            found_late = forward_loop is None and not has_record(model) and forward_dummy(model)
        if found_late:
            make_deployable(model, probe=recorder.probe())
    return model


def _refuse_four_over_six(model: nn.Module, methods: list[str]) -> None:
    """ValueError when an algorithm other than max would calibrate a "four over six" quantizer
    (its per-block M=4/M=6 choice is made by the format; the other algorithms search plain NVFP4)."""
    others = [m for m in methods if m != "max"]
    if not others:
        return
    for name, quantizer in iter_tensor_quantizers(model):
        if quantizer.is_enabled and quantizer.format.four_over_six:
            raise ValueError(
                f"quantizer {name} is NVFP4 'four over six', which calibrates with algorithm 'max' "
                f"only (each block picks M=4 or M=6 itself); got {others}"
            )


def _run_algorithm(
    model: nn.Module,
    run: AlgorithmRun,
    forward_loop: ForwardLoop | None,
    recorder: InputRecorder,
) -> None:
    """Run one algorithm; on failure every quantizer is back in normal (quantizing) mode.
    Under ``layerwise`` each decoder layer is made deployable as soon as it is calibrated, so the
    next layer sees the outputs the exported layer computes."""

    def layer_done(prefix: str, probe: Callable[[], Any]) -> None:
        recorder.record()
        make_deployable(model, prefix=prefix, probe=probe)

    method, fn, options, layerwise = run.method, run.fn, run.options, run.layerwise
    loop = _LoopGuard(model, forward_loop, method) if forward_loop is not None else None
    try:
        with torch.no_grad():
            if layerwise.enable and not (
                layerwise.when_stacked and find_decoder_layers(model) is None
            ):
                qdq = layerwise.get_qdq_activations_from_prev_layer
                layerwise_calibrate(model, fn, forward_loop, options, qdq, layer_done)
                recorder.record()
                make_deployable(model, probe=recorder.probe())  # what is outside the layers
            else:
                with weights_materialized(model):
                    fn(model, loop, **options)
                    recorder.record()
                    make_deployable(model, probe=recorder.probe())
    except TypeError as err:
        _reset_calibration_state(model)
        if "unexpected keyword argument" in str(err):
            raise ValueError(
                f"algorithm {method!r} does not take option(s) {sorted(options)}: {err}"
            ) from err
        raise
    except BaseException:
        _reset_calibration_state(model)
        raise


def postprocess_amax(
    model: nn.Module,
    key: str | Callable[[str], bool],
    post_process_fn: Callable[[torch.Tensor], torch.Tensor],
) -> nn.Module:
    """Replace the amax of every TensorQuantizer whose name matches ``key`` by ``post_process_fn(amax)``."""
    entry = QuantCfgEntry(key)
    for name, quantizer in iter_tensor_quantizers(model):
        if entry.matches(name, set()) and quantizer.amax is not None:
            quantizer.amax = post_process_fn(quantizer.amax.detach().clone())
    return model
