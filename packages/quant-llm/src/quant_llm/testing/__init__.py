"""Fixtures for tests, examples and benchmarks (not used by the library itself): tiny randomly
initialised Hugging Face models (`tiny_models`) and the real models available offline (`real_models`)."""
