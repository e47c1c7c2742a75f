"""Layers of the decoder: NF4 linear, rotary embedding, normalisation."""
