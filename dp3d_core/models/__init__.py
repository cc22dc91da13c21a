"""DiffPortrait3D networks on diffusers building blocks (F, F_ref, F_cam, view modules, prompt embedding)."""
from .config import ModelConfigError, network_configs, official_params
from .denoiser import DiffPortrait3DDenoiser, ModelInputError
from .prompt_embedding import PromptEmbedding
from .view_modules import ViewModules, ViewTransformer

__all__ = [
    "DiffPortrait3DDenoiser",
    "ModelConfigError",
    "ModelInputError",
    "PromptEmbedding",
    "ViewModules",
    "ViewTransformer",
    "network_configs",
    "official_params",
]
