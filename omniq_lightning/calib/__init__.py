"""Block-wise calibration: activation cache (and, with the OmniQuant issue, the Lightning modules)."""

from omniq_lightning.calib.cache import ActivationCache

__all__ = ["ActivationCache"]
