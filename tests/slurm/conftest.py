"""Registers the `slurm` marker: tests that bring up a real (throwaway, localhost) Slurm cluster. Deselect them
with `pytest -m "not slurm"`."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: brings up a two-node Slurm cluster on localhost (root + apt); "
                                       "deselect with -m 'not slurm'")
