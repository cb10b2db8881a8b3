"""Invertible Diffusion Models for imaging inverse problems."""
