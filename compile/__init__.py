"""kiln compile: one module per ahead-of-time target, a registry, target-block construction."""
