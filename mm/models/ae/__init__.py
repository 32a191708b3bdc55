"""Video autoencoders: the Wan VAE (Wan2.1 and Wan2.2)."""

from mm.models.ae.wan_vae import WanVAE, WanVAEConfig, load_wan_vae, save_wan_vae

__all__ = ["WanVAE", "WanVAEConfig", "load_wan_vae", "save_wan_vae"]
