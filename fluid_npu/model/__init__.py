"""Causal LMs (openPangu without remote code), the MASK token, the FLUID attention, the K-head."""
