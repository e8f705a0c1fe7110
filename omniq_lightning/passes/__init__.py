"""The model-level stage: passes over the whole model that run before the block loop.

A pass sees the whole model (embedding, every block, final norm and head, through the adapter's declared
model sites) and the calibration windows; it may change the model (a rotation of the residual stream) and may
decide per-linear weight formats (a mixed-precision bit plan). What it decided is saved in the run state
(``state.json`` and ``passes/<name>.safetensors``) and handed back to it on a rerun (``PassContext.saved``), so
a resumed run keeps it; its digest is part of every block's fingerprint, so finished blocks are never reused
under a different stage result.
"""

from omniq_lightning.passes.base import ModelPass, PassContext, PassResult, SavedPass, run_passes

__all__ = ["ModelPass", "PassContext", "PassResult", "SavedPass", "run_passes"]
