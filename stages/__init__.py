"""DVC stages of the sui pipeline: one thin module per stage (`python -m stages.<name>`), plus the `sui` CLI."""
