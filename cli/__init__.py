"""The `mochi` command line (installed as mochi_hub.cli): each command maps options onto a config."""
