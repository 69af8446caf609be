"""Pieces every backend shares: loss functions and the adapter optimizer."""
