"""``export.format=fake``: the fake-quant checkpoint alone (``export/hf.py``), which every run writes anyway; it
holds any quantization (weight-activation runs re-attach their quantizers with ``load_fake_quant``)."""

from __future__ import annotations

from pathlib import Path

from omniq_lightning.export.online import ONLINE_KINDS
from omniq_lightning.export.registry import Exporter, ExportJob, register_exporter


class FakeQuantExporter(Exporter):
    name = "fake"
    needs_codes = False
    online_kinds = frozenset(ONLINE_KINDS)  # in omniq_runtime.safetensors and the manifest

    def write(self, job: ExportJob) -> Path:
        return job.fake_dir


register_exporter(FakeQuantExporter())
