"""imagebuild: declarative, input-addressed builds of the vLLM GB10 cluster images."""

__version__ = "0.1.0"
