"""What prefill and decode slot processes share: the engine thread, group registration, the process frame."""
