"""Degenerate activation statistics: an amax of 0 from calibration data that was all zeros.

An activation amax of 0 makes every later input of that quantizer quantize to 0 (scale 0), which
silently zeroes the layer at inference. It comes from calibration data that never reached the
layer with a non-zero value (padding-only batches, a branch the data never takes). Such an amax
is not loaded: the quantizer keeps the amax it had (None when it was never calibrated, so it
takes each input's amax and warns once when it runs), and a :class:`QuantWarning` names it.
"""

from __future__ import annotations

import torch

from quant_core.diagnostics import warn

__all__ = ["load_activation_amax"]

_REMEDY = (
    "calibrate with batches of real data (not only padding or zeros) that reach this layer, "
    "or set its amax explicitly"
)


def load_activation_amax(quantizer) -> None:
    """``quantizer.load_calib_amax()``, refusing (with a warning) an amax that is 0 everywhere.

    An amax with some zero entries (per-channel / per-block) is loaded, with a warning naming how
    many entries are 0: those channels or blocks quantize to 0 at inference.
    """
    before = quantizer.amax
    before = None if before is None else before.detach().clone()
    quantizer.load_calib_amax()
    amax = quantizer.amax
    if amax is None or amax.numel() == 0 or amax.device.type == "meta":
        return
    if before is not None and before.shape == amax.shape and torch.equal(before, amax):
        return  # nothing new was collected
    zeros = int((amax == 0).sum())
    name = quantizer._name or "(unnamed quantizer)"
    if zeros == amax.numel():
        quantizer.amax = before
        kept = "its previous amax is kept" if before is not None else "it stays uncalibrated"
        warn(
            f"calibration gave quantizer {name} an amax of 0 (it saw only zeros), which would "
            f"quantize every later input to 0; the amax was not set and {kept}. Remedy: {_REMEDY}.",
            stacklevel=4,
        )
    elif zeros:
        warn(
            f"calibration gave quantizer {name} an amax of 0 in {zeros} of {amax.numel()} "
            f"channels/blocks (they saw only zeros); those quantize every later input to 0. "
            f"Remedy: {_REMEDY}.",
            stacklevel=4,
        )
