"""One-off diagnostics behind the recipes in docs/experiments.md (not run by `make bench`)."""
