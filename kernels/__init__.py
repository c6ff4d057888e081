"""Triton kernels with PyTorch references: MoE token permute/unpermute and fused MLA RoPE."""
