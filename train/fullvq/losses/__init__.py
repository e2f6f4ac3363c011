"""Training losses: pixel, perceptual (LPIPS), adversarial (PatchGAN)."""
