"""Repository tools: thin ``mm`` subcommand wrappers (tools/*.py) and the benchmarks (tools/bench/)."""
