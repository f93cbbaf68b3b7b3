"""Stand-ins used by the tests, the benchmarks and the demo (see ``workload``)."""
