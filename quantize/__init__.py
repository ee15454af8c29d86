"""kiln quantize: one module per method family, a registry keyed by config name, fidelity reports."""
