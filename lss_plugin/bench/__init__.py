"""Side-by-side benchmark of LSS and the baselines (`python -m lss_plugin.bench`)."""
