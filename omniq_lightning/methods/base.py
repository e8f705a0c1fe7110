"""The method interface: what a method declares (settings it refuses, models it cannot take, the weight format
capabilities and the data it needs), how it sets up a block, calibrates it and folds it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from omniq_lightning.calib import BlockDataModule, BlockRun
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import BlockSetup, QuantBlock, TransformSite


@dataclass(frozen=True)
class ModelTraits:
    """What a method may know of the model it quantizes (the adapter's answers, structure only).

    recipe_family: which released recipes apply ("llama": RMSNorm, rotary, gated MLP; "opt").
    let_for_weight_only: whether the family's released weight-only recipes use LET.
    experts: whether its blocks hold mixture-of-experts MLPs.
    sites: block 0's transform sites.
    residual_norm: the norms that read the residual stream, "rms" or "layer".
    sandwich_norms: whether norms sit between the blocks' output projections and the residual stream (Gemma).
    """

    recipe_family: str
    let_for_weight_only: bool = False
    experts: bool = False
    sites: tuple[TransformSite, ...] = ()
    residual_norm: str = "rms"
    sandwich_norms: bool = False


@dataclass(frozen=True)
class DataNeeds:
    """What the block loop hands a method besides the block's inputs and full-precision targets.

    augmented_targets: also the full-precision block's outputs on the quantized inputs (OmniQuant's aug_loss).
    batch_size: samples per training step.
    moment_bytes: bytes per element of the input second-moment matrices (``in x in``) the method holds for every
    quantized linear of a block at once: 8 for float64 Hessians (GPTQ, VPTQ), 4 for float32 Gram matrices (AWQ),
    0 for none (the memory plan's figure; see ``omniq_lightning.memory``).
    trains: the method back-propagates through the block (the memory plan counts gradients and saved activations).
    """

    augmented_targets: bool = False
    batch_size: int = 1
    moment_bytes: int = 0
    trains: bool = False


class Method:
    """One algorithm, built from the ``method`` config (its ``_target_``; ``name`` labels the results, ``tag``
    names the run's folder). The pipeline asks it, before any work, which settings (:meth:`validate`) and models
    (:meth:`check_model`) it refuses, which weight format capabilities it needs (:meth:`format_needs`, see
    ``nn.formats``), which data (:meth:`data_needs`) and which whole-model passes (:meth:`model_passes`); then, per block, :meth:`setup` decides the quantized
    block's shape, :meth:`calibrate` fits its parameters and :meth:`finalize` folds them into plain weights."""

    name: str = ""

    def __init__(self, *, name: str | None = None, tag: str | None = None) -> None:
        self.name = name or type(self).name
        self.tag = tag or self.name

    def validate(self, spec: QuantSpec) -> None:
        """Refuse quantization settings this method cannot handle (called before any model loads)."""

    def check_model(self, traits: ModelTraits) -> None:
        """Refuse a model this method cannot quantize (called after loading, before any calibration)."""

    def check_world(self, ranks: int) -> None:
        """Refuse a data-parallel run of ``ranks`` ranks whose statistics this method cannot combine across them
        (called before any model loads)."""

    def format_needs(self) -> frozenset[str]:
        """The capabilities every weight format of the run must have (``nn.formats.CAPABILITIES``)."""
        return frozenset({"quantizer"})

    def data_needs(self) -> DataNeeds:
        return DataNeeds()

    def model_passes(self, spec: QuantSpec) -> list:
        """The whole-model passes (``passes.ModelPass``) this method runs before the block loop."""
        return []

    def setup(self, spec: QuantSpec, traits: ModelTraits) -> BlockSetup:
        """How blocks are built: the spec, which sites get diagonal transforms."""
        raise NotImplementedError

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> dict[str, float] | None:
        """Fit the block's parameters; the block is left on ``run.device``. May return statistics for the
        block's record in results.json."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The method's settings as resolved for this run (recorded in results.json)."""
        return {}

    def finalize(self, qblock: QuantBlock) -> nn.Module:
        return qblock.fold()
