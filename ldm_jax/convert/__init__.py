"""Pretrained weights: CompVis / Stable Diffusion single files and diffusers folders -> ldm_jax workdirs.

    python -m ldm_jax.convert SRC --out OUT [--format auto|compvis|diffusers]

See docs/pretrained.md. PyTorch is needed only to read .ckpt/.bin files (safetensors need none).
"""

from ldm_jax.convert.core import ConversionError, load_state_dict
from ldm_jax.convert.sources import Converted, from_compvis, from_diffusers

__all__ = ["ConversionError", "Converted", "from_compvis", "from_diffusers", "load_state_dict"]
