"""Will it fit, and how long: memory and time estimates for a model on a cluster (`python -m bpo.plan`)."""
