"""Batched image preprocessing on the model's device, reproducing ``BlipImageProcessorPil``.

The checkpoint's PIL processor resizes one crop at a time on one CPU thread (milliseconds per
crop at 384 px), which alone would cap a GPU actor at a few hundred cells/s. Here a batch of
uint8 crops goes to the device in one copy (from pinned host memory on CUDA) and is resized,
rescaled and normalised there with the same arithmetic as PIL:

- PIL resamples with a convolution whose support widens with the downscale factor (bicubic
  a = -0.5, or bilinear); ``interpolate(..., antialias=True)`` implements the same kernels in
  both directions (without ``antialias`` torch's bicubic uses a = -0.75 and no widening).
- PIL works on 8-bit images: it resizes horizontally, stores uint8 (clipped, rounded), then
  vertically, and stores uint8 again. On the CPU torch's uint8 kernel does the same; on CUDA
  (float kernels only) the two passes and both roundings are repeated in float. Either way the
  result differs from PIL's only where a rounding lands on the other side of .5 (PIL uses
  fixed-point weights): under 1 % of values, by one uint8 step, rarely two.

Only settings that can be reproduced are accepted (:func:`plan_for`); anything else (centre crop,
padding, another resample filter, shortest-edge sizes, another processor class) makes the
caller use the processor itself, so the model never silently sees different inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hemblip.errors import DatasetError

_log = logging.getLogger(__name__)

# PIL.Image.Resampling values (what the processor's ``resample`` holds).
_MODES = {2: "bilinear", 3: "bicubic"}
# to_dict() keys that either are handled below or carry no processing setting.
_KNOWN = {
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "image_processor_type",
    "resample",
    "rescale_factor",
    "size",
    "processor_class",
    "_processor_class",
}
# Settings that are fine while off.
_OFF_OK = {"do_center_crop", "crop_size", "do_pad", "pad_size"}


@dataclass(frozen=True)
class DevicePreprocess:
    """What the processor does, as device operations. ``size``: (height, width) or None (no
    resize); ``mode``: "bicubic" | "bilinear"; ``rescale``: factor or None; ``mean``/``std``:
    per-channel tuples or None (no normalisation). ``float_kernel``: resize with the float
    kernels (as on CUDA) even on the CPU; None = only where there is no uint8 kernel (tests use
    True to check the CUDA arithmetic on a CPU)."""

    size: tuple[int, int] | None
    mode: str
    rescale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    float_kernel: bool | None = None

    def __call__(self, crops, device):
        """float32 pixel values (N, 3, S, S) on ``device`` for uint8 crops.

        ``crops``: (N, H, W, 3) uint8 array or a list of (H, W, 3) uint8 arrays (sizes may differ
        when the processor resizes: each size is processed as its own batch). Values are in the
        processor's normalised units ((x / 255 - mean) / std for BLIP).
        """
        import torch

        device = torch.device(device)
        if isinstance(crops, np.ndarray):
            return self._batch(crops, device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[:2]), []).append(i)
        if len(groups) == 1:
            return self._batch(
                np.stack(crops) if crops else np.zeros((0, 1, 1, 3), np.uint8), device
            )
        if self.size is None:
            raise DatasetError(
                f"crops: sizes differ ({', '.join(f'{h}x{w}' for h, w in groups)}) "
                "and the image processor does not resize"
            )
        out = torch.empty((len(crops), 3, *self.size), dtype=torch.float32, device=device)
        for idx in groups.values():
            px = self._batch(np.stack([crops[i] for i in idx]), device)
            out[torch.as_tensor(idx, device=device)] = px
        return out

    def _batch(self, arr: np.ndarray, device):
        import torch
        from torch.nn.functional import interpolate

        _check(arr)
        if not len(arr):
            hw = self.size or arr.shape[1:3]
            return torch.empty((0, 3, *hw), dtype=torch.float32, device=device)
        # (N, 3, H, W) view with channels-last strides: no copy before the resize.
        x = stage(arr, device).to(device, non_blocking=True).permute(0, 3, 1, 2)
        h, w = x.shape[2:]
        if self.size is not None and (h, w) != self.size:
            th, tw = self.size
            if device.type == "cpu" and not self.float_kernel:
                # torch's uint8 kernel is PIL's algorithm (separable, rounded per pass), and
                # vectorised: 10-30x faster on a CPU than the float kernel.
                x = interpolate(
                    x, size=(th, tw), mode=self.mode, antialias=True, align_corners=False
                )
            else:
                try:
                    x = self._float_resize(x)
                except RuntimeError as exc:
                    # CUDA's antialiased kernel keeps its weights in shared memory and refuses
                    # very large downscale factors: such a batch is resized on the CPU instead.
                    if device.type == "cpu":
                        raise
                    _log.warning(
                        "device resize %dx%d -> %dx%d failed (%s); resizing on the CPU",
                        h,
                        w,
                        th,
                        tw,
                        str(exc).splitlines()[0],
                    )
                    cpu = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
                    cpu = interpolate(
                        cpu, size=(th, tw), mode=self.mode, antialias=True, align_corners=False
                    )
                    x = cpu.contiguous().to(device)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        if self.rescale is not None:
            x = x.mul_(self.rescale)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            x = x.sub_(mean).div_(std)
        return x

    def _float_resize(self, x):
        """Float kernels with PIL's pass order and per-pass uint8 rounding (no uint8 kernel on
        CUDA). ``x``: uint8 or float (N, 3, H, W) with values 0..255."""
        from torch.nn.functional import interpolate

        x = x.float().contiguous()
        h, w = x.shape[2:]
        th, tw = self.size
        if w != tw:
            x = interpolate(x, size=(h, tw), mode=self.mode, antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_()
        if h != th:
            x = interpolate(x, size=(th, tw), mode=self.mode, antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_()
        return x


def stage(arr: np.ndarray, device):
    """Host tensor of a uint8 (N, H, W, 3) batch, page-locked when ``device`` is CUDA so that the
    copy to the device is one asynchronous DMA transfer (torch's host allocator keeps the buffer
    alive until the copy has finished)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t


def _check(arr: np.ndarray) -> None:
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
        raise DatasetError(
            f"crops: expected an (N, H, W, 3) uint8 array, got shape {arr.shape} dtype {arr.dtype}"
        )


def _triple(v, name: str) -> tuple[float, float, float]:
    vals = [float(v)] * 3 if np.isscalar(v) else [float(x) for x in v]
    if len(vals) != 3:
        raise ValueError(f"{name} has {len(vals)} values, not 3")
    return tuple(vals)  # type: ignore[return-value]


def plan_for(image_processor) -> tuple[DevicePreprocess | None, str | None]:
    """``(plan, None)`` when ``image_processor`` can be reproduced on the device, else
    ``(None, reason)``: the reason names the setting that cannot."""
    try:
        from transformers import BlipImageProcessorPil
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        return None, f"transformers has no BlipImageProcessorPil ({exc})"
    if type(image_processor) is not BlipImageProcessorPil:
        return (
            None,
            f"image processor class {type(image_processor).__name__} is not BlipImageProcessorPil",
        )
    p = image_processor
    settings = p.to_dict()
    for key, value in settings.items():
        if key in _OFF_OK:
            continue
        if key not in _KNOWN and value is not None:
            return None, f"image processor setting {key}={value!r} is not reproduced on the device"
    for key in ("do_center_crop", "do_pad"):
        if getattr(p, key, None):
            return None, f"image processor setting {key}=True is not reproduced on the device"
    size = None
    mode = "bicubic"
    if p.do_resize:
        s = p.size
        get = s.get if isinstance(s, dict) else (lambda k: getattr(s, k, None))
        others = [
            k
            for k in (
                "shortest_edge",
                "longest_edge",
                "max_height",
                "max_width",
                "min_pixels",
                "max_pixels",
            )
            if get(k)
        ]
        if others or not (get("height") and get("width")):
            return None, f"image processor size {s} is not a fixed height x width"
        size = (int(get("height")), int(get("width")))
        resample = 2 if p.resample is None else int(p.resample)  # PIL backend's default: bilinear
        if resample not in _MODES:
            return None, f"image processor resample={p.resample!r} is not bicubic or bilinear"
        mode = _MODES[resample]
    rescale = float(p.rescale_factor) if p.do_rescale else None
    mean = std = None
    if p.do_normalize:
        try:
            mean, std = _triple(p.image_mean, "image_mean"), _triple(p.image_std, "image_std")
        except (TypeError, ValueError) as exc:
            return None, f"image processor normalisation not reproduced: {exc}"
    return DevicePreprocess(size, mode, rescale, mean, std), None
