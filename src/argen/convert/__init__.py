"""Loaders for official checkpoints of other repositories (weights only, never their code)."""
