"""The nemesis harness (README.md): random faults during real operations, invariants after each seed."""
