"""The `reparam` command line: a thin click layer over `reparam_zoo` (installed as `reparam_zoo.cli`)."""
