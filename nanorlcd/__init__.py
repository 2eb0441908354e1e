"""nanorlcd: RLCD (Yang et al., ICLR 2024) from scratch — LLaMA, sampling, preference simulation,
PM and PPO."""
