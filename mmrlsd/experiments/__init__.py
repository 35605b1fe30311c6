"""Experiments run on top of the library: the speed benchmark (`perf`) and the tiny lab (`lab`)."""
