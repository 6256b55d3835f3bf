"""python -m bpo.build_data --config FILE [section.key=value ...] (bpo/build_data/job.py says what it writes)."""

if __name__ == "__main__":
    from bpo import cli
    from bpo.build_data.job import main

    cli.run(main)
