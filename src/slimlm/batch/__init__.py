"""Offline batch jobs over OpenAI batch files: ``slimlm batch INPUT.jsonl OUTPUT.jsonl``.

records.py: input lines -> rows or error records, rows -> output records (OpenAI's batch format);
local.py: the restartable local job (one engine, a progress bar); ray_job.py: the same rows over
a Ray Dataset, one engine per worker; cli.py: the subcommand.
"""
