"""The throughput benchmark: ``bash run.sh bench`` (``python -m src.tools.bench``). Rows in ``rows.py``, the command, ratios,
projection and report in ``main.py``; what it measures and the numbers so far: src/speed/README.md."""
