"""`python -m reparam_zoo.train` is not an entry point: say which one is."""
raise SystemExit("error: run `reparam train ...` (under torchrun: torchrun --no-python reparam train ...)")
