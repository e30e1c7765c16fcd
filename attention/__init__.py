"""Identity and style adapters: weight files, projections, routed cross-attention, the model patch."""
