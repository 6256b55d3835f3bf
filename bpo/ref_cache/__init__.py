"""The reference log-prob cache (store) and the fingerprint that says which cache fits a run (fingerprint)."""
