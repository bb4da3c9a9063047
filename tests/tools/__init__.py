"""The project's own test tooling, beside the test suite and not installed with the library:
fault proxy and campaign, fuzzers, load test, consistency runs, server spawners, kernel link
shaping and the real-model pytest fixtures."""
