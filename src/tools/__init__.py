"""Tooling around the solution: fetching the official files, the generated miniature data, the benchmark."""
