"""Resolvers: one module per source type (github, git, url, hf) and per backend (python, nix, fod)."""
