"""Stages: one module per stage (its config, its per-layer function on a LayerContext, its registry SPEC);
`registry.STAGES` lists them."""
