"""tunectl: fine-tune, export and convert LLMs as a pipeline of stages, locally or on Kubernetes."""

__version__ = "0.1.0"
