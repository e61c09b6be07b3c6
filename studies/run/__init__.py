"""`python -m studies.run`: an ablation study (spec, resolve, execute), its provenance and the report at its end."""
