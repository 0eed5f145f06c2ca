"""``mm serve``: an OpenAI-compatible chat API with request batching, and an optional web demo."""
from mm.serve.app import ServeSettings, create_app
from mm.serve.engine import Engine, Job, QueueFull

__all__ = ["create_app", "ServeSettings", "Engine", "Job", "QueueFull"]
