"""GGUF import: a llama.cpp model file becomes a Hugging Face checkpoint folder the engine loads.

`import_gguf(file, out, dtype)` (`importer.py`) reads the file (`reader.py`), maps its metadata to
config.json (`hparams.py`), dequantizes its tensors into safetensors (`tensors.py`) and rebuilds
its tokenizer (`tokenizer.py`); `nitsum import-gguf` is the same on the command line (`cli.py`).
`default_model.py` fetches and imports the model `nitsum up` serves when given none.

Nothing is imported here, so that `nitsum` can name the default model without loading PyTorch.
"""
