"""The `map` stage: fused inference over prepared tiles (Ray Data), its ledger, and the run layout on disk."""
