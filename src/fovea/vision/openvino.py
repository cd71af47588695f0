"""An OpenVINO runtime for an encoder's forward pass on the CPU (optional extra ``fovea-vlm[openvino]``).

Measured on a 2-core AVX2 EPYC, fp32, one thread, interleaved with torch (docs/precision.md): fused FastViTHD at
1024x768 ran 1.31x faster than torch, the reading encoder 1.25x, outputs within 3e-7 relative error. Conversion and
compilation cost 26-96 s per input shape, so compiled models are kept per shape and the runtime suits servers that
see a few page sizes, not one-off calls. Weights stay in torch: the encoder is converted from its current state
(fused first, since FastViT's inference form is what runs), and ``reset`` forgets compiled shapes after a change.
"""

from __future__ import annotations

import torch

from fovea.vision.base import Encoder


class OpenVINORunner:
    """Runs ``encoder.features`` through OpenVINO on the CPU: (B,3,H,W) -> (B,C,h,w), one compiled model per
    input shape."""

    def __init__(self, encoder: Encoder, *, threads: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        try:
            import openvino  # noqa: F401
        except ImportError as err:
            raise ValueError("encoder runtime 'openvino' needs the openvino package: pip install "
                             "'fovea-vlm[openvino]'") from err
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the OpenVINO encoder runtime computes in float32 or bfloat16, not {dtype}")
        weights = next(encoder.parameters())
        if weights.device.type != "cpu" or weights.dtype != torch.float32:
            raise ValueError(f"the OpenVINO encoder runtime converts a CPU fp32 encoder, got {weights.device} "
                             f"{weights.dtype}")
        self.encoder, self.threads, self.dtype = encoder, threads, dtype
        self._compiled: dict[tuple[int, ...], object] = {}

    def reset(self) -> None:
        self._compiled.clear()

    def _compile(self, shape: tuple[int, ...]):
        import openvino as ov

        example = torch.zeros(shape)
        with torch.no_grad():
            model = ov.convert_model(self.encoder.eval(), example_input=example)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.dtype == torch.bfloat16 else "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return ov.Core().compile_model(model, "CPU", config)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoder.check_input(pixels)
        shape = tuple(pixels.shape)
        if shape not in self._compiled:
            self._compiled[shape] = self._compile(shape)
        out = self._compiled[shape](pixels.detach().float().contiguous().numpy())[0]
        return torch.from_numpy(out.copy()).to(self.dtype)  # (B,C,h,w)
